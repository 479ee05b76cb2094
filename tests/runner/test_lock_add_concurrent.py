"""`lock add` takes a file lock (issue 10 item 17): concurrent adds on one lock file never lose an entry."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from secure_run.manifests import SignerInfo, pin_model

WORKERS = 4
EACH = 25


def _adder(lock: str, worker: int) -> None:
    signer = SignerInfo("key", key_sha256="cd" * 32)
    for i in range(EACH):
        pin_model(lock, f"m{worker}-{i}", root_digest="ab" * 32, signer=signer, public_key="org.pub.pem")


def test_parallel_lock_adds_keep_every_entry(tmp_path: Path) -> None:
    lock = tmp_path / "models.lock.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_adder, args=(str(lock), w)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    names = set(json.loads(lock.read_text())["models"])
    expected = {f"m{w}-{i}" for w in range(WORKERS) for i in range(EACH)}
    assert names == expected, f"lost {len(expected - names)} of {len(expected)} entries"
    assert not [p.name for p in tmp_path.iterdir() if p.name != "models.lock.json"]  # no temp files left
