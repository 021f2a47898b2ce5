"""Incremental detokenization: turn a growing list of token ids into text deltas.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers: one character can
span tokens (UTF-8 bytes split across tokens) and a token's leading space depends on what comes
before it. So we decode a small window twice — the already-read part and the part with the new
tokens — and hand out the difference, holding it back while it ends in an incomplete character.

Invariant: the concatenation of all deltas plus `flush()` equals the decoded completion.
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
