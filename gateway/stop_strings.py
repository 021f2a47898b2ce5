"""Stop strings, matched on the detokenized text, including across token boundaries.

Text is handed out as it arrives except for a tail that could still be the start of a stop
string (the longest stop minus one character); that tail is released when more text shows it
is not a stop, or at the end. With include_stop_str_in_output the stop itself is sent, so no
tail needs holding back.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], include_in_output: bool = False) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._include = include_in_output
        longest = max((len(s) for s in self._stops), default=0)
        self._window = max(longest - 1, 0)  # a match may start this far back in old text
        self._holdback = 0 if include_in_output else self._window
        self._text = ""
        self._emitted = 0  # characters of _text handed out so far
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        """Append text; return what may be sent now. After a match, `matched` is set."""
        if self.matched is not None:
            return ""
        search_from = max(len(self._text) - self._window, 0)
        self._text += piece
        hit = self._earliest_match(search_from)
        if hit is not None:
            start, stop = hit
            self.matched = stop
            return self._emit_until(start + len(stop) if self._include else start)
        return self._emit_until(len(self._text) - self._holdback)

    def flush(self) -> str:
        """At the end of the completion: release the held tail (nothing after a match)."""
        if self.matched is not None:
            return ""
        return self._emit_until(len(self._text))

    def _earliest_match(self, search_from: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _emit_until(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
