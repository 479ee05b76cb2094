"""Progress display for long work (hashing, copying): rich on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
import threading
from typing import Any


class _RichProgress:
    """Hashing/copy progress rendered with rich on stderr (implements manifests.ProgressSink)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._progress: Any = None
        self._task: Any = None

    def start(self, total_bytes: int, total_files: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
        self._progress = Progress(*columns, console=Console(stderr=True), transient=True)
        what = f"{self.label} {total_files} files" if total_files else self.label
        self._task = self._progress.add_task(what, total=total_bytes or None)
        self._progress.start()

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress.advance(self._task, nbytes)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def hashing_progress(as_json: bool, label: str) -> _RichProgress | None:
    """A rich progress bar on stderr when it is a terminal and ``--json`` is off; else None."""
    return None if as_json or not sys.stderr.isatty() else _RichProgress(label)
