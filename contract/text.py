"""Text out of token ids, written once for every layer: incremental detokenization and stop
strings. The gateway runs them on worker tokens; the engine runs them for requests that carry stop
strings (offline `LLM`, or an engine driven directly), so both stop at the same character.

Incremental detokenization: decoding token by token is wrong for byte-level and SentencePiece
tokenizers: one character can span tokens (UTF-8 bytes split across tokens) and a token's leading
space depends on what comes before it. So we decode a small window twice -- the already-read part
and the part with the new tokens -- and hand out the difference, holding it back while it ends in
an incomplete character. Invariant: the concatenation of all deltas plus `flush()` equals the
decoded completion.

Stop strings: text is handed out as it arrives except for a tail that could still be the start of a stop
string (the longest stop minus one character); that tail is released when more text shows it
is not a stop, or at the end. With include_stop_str_in_output the stop itself is sent, so no
tail needs holding back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens kept as left context so the first completion token decodes in place.
PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: tokens before it are forgotten
        self._read = len(self._ids)  # tokens before this have been turned into text

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is partial)."""
        self._ids.append(token_id)
        read_text, full_text = self._window_texts()
        if full_text.endswith(_INCOMPLETE) or len(full_text) <= len(read_text):
            return ""
        self._advance()
        return full_text[len(read_text) :]

    def flush(self) -> str:
        """The text of tokens still held back (a trailing partial character decodes as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        read_text, full_text = self._window_texts()
        self._advance()
        return full_text[len(read_text) :]

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix :]
        read = self._read - self._prefix
        decode = self._tokenizer.decode
        return decode(window[:read], skip_special_tokens=self._skip), decode(
            window, skip_special_tokens=self._skip
        )

    def _advance(self) -> None:
        """Everything so far is read; the next window starts at the old read offset."""
        dropped = self._prefix
        del self._ids[:dropped]  # never decoded again
        self._prefix = self._read - dropped
        self._read = len(self._ids)

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
        self._checked_from = 0  # text before this is never searched
        self.matched: str | None = None

    def feed(self, piece: str, *, check: bool = True) -> str:
        """Append text; return what may be sent now. After a match, `matched` is set.

        With check=False the text is handed out whole and never searched (the tokens before
        min_tokens: a stop string there does not count)."""
        if self.matched is not None:
            return ""
        if not check:
            self._text += piece
            self._checked_from = len(self._text)
            return self._emit_until(len(self._text))
        search_from = max(len(self._text) - self._window, self._checked_from)
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


class TextStream:
    """One completion's text: tokens in, text deltas out, stopped at the first stop string that
    ends after the first `min_tokens` tokens (vLLM's rule). Tokens after the one that completes a
    stop string add nothing."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
        *,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self._stops = StopStringMatcher(stops, include_stop_str_in_output)
        self._unchecked = min_tokens  # the first min_tokens tokens cannot end on a stop string

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stops.matched

    def add(self, token_id: int) -> str:
        if self._stops.matched is not None:
            return ""
        check = self._unchecked <= 0
        self._unchecked -= 1
        return self._stops.feed(self._detok.add(token_id), check=check)

    def flush(self) -> str:
        """At the end: the text still held back (a partial character, a possible stop's start)."""
        if self._stops.matched is not None:
            return ""
        return self._stops.feed(self._detok.flush()) + self._stops.flush()
