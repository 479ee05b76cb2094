"""Stop strings applied on the host to the (guardrail-checked) text stream of one completion.

    >>> s = StopStrings(["</answer>"])
    >>> s.feed("42</ans"), s.feed("wer> and more"), s.stopped
    ('42', '', True)

Text is released as soon as it cannot be the start of a stop string; the earliest stop string in
the stream ends the completion, and neither it nor anything after it is released. Matching is
exact (case-sensitive, no normalisation), across chunk boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """Streaming matcher for a set of stop strings (empty set: passes everything through)."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def _hold_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> str:
        """The part of ``text`` (plus held-back text) that can be released now."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, stop = min(hits)
            self.stopped, self.matched, self._held = True, stop, ""
            return buf[:at]
        keep = self._hold_back(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """At the end of the stream: release what was held back (it never became a stop string)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held
