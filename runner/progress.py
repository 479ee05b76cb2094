"""Progress display for long work (hashing, copying) on stderr.

* stderr is a terminal (and no ``--json``): a rich progress bar;
* otherwise (CI logs, pipes, ``--json``): one plain line every few seconds (bytes, rate, ETA), so a
  multi-GB verify never goes silent for minutes. Work that ends within the first interval prints
  nothing;
* ``--quiet``: nothing.

The interval is ``SECURE_RUN_PROGRESS_INTERVAL`` seconds (default 5).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from secure_run.runner.output import SETTINGS

DEFAULT_INTERVAL_S = 5.0


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


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LineProgress:
    """Plain progress lines for logs: ``label: 12.30 GB / 63.30 GB (19%), 1.02 GB/s, ETA 0m50s``.

    Thread-safe (``advance`` is called from hashing threads). ``clock`` is injectable for tests.
    """

    def __init__(self, label: str, *, interval: float = DEFAULT_INTERVAL_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.interval = interval
        self._stream = stream
        self._clock = clock
        self._lock = threading.Lock()
        self._total = 0
        self._files = 0
        self._done = 0
        self._t0 = 0.0
        self._last = 0.0
        self._printed = False

    def start(self, total_bytes: int, total_files: int) -> None:
        with self._lock:
            self._total, self._files, self._done = total_bytes, total_files, 0
            self._t0 = self._last = self._clock()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            now = self._clock()
            if now - self._last >= self.interval:
                self._last = now
                self._write(self.line(now))

    def finish(self) -> None:
        with self._lock:
            if self._printed:  # close a run that showed progress with its total
                now = self._clock()
                self._write(f"{self.label}: done, {_size(self._done)} in {_duration(now - self._t0)}")

    def line(self, now: float) -> str:
        """The progress line at time ``now`` (bytes, percentage, rate, ETA)."""
        elapsed = max(now - self._t0, 1e-9)
        rate = self._done / elapsed
        text = f"{self.label}: {_size(self._done)}"
        if self._total:
            text += f" / {_size(self._total)} ({100 * self._done / self._total:.0f}%)"
        text += f", {_size(rate)}/s"
        if self._total and rate > 0:
            text += f", ETA {_duration(max(self._total - self._done, 0) / rate)}"
        return text

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()
        self._printed = True


def _interval() -> float:
    raw = os.environ.get("SECURE_RUN_PROGRESS_INTERVAL", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def hashing_progress(as_json: bool, label: str) -> _RichProgress | LineProgress | None:
    """Where progress goes: a rich bar on a terminal, lines every few seconds otherwise, nothing if quiet."""
    if SETTINGS.verbosity < 0:
        return None
    if sys.stderr.isatty() and not as_json:
        return _RichProgress(label)
    return LineProgress(label, interval=_interval())
