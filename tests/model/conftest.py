"""Fixtures of the model tests.

The model tests run many tiny ops; with several OpenMP threads on a busy 2-core CI host they spend
most of their time spinning, so every test here runs with one torch thread (restored afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import TINY, random_state, write_folder

from secure_run.model.config import config_from_dict


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def folder_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(config: Mapping[str, Any] = TINY, state: Mapping[str, torch.Tensor] | None = None, *,
             shards: int = 1, seed: int = 0) -> Path:
        cfg = config_from_dict(config)
        return write_folder(tmp_path / f"m{next(counter)}", config, state if state is not None else
                            random_state(cfg, seed), shards=shards)

    return make
