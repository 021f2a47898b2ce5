"""Logprobs in OpenAI's two shapes: completions (parallel lists) and chat (a list of entries)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.schema import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf


def _finite(logprob: float) -> float:
    return logprob if logprob > _FLOOR else _FLOOR


class TokenTexts(Protocol):
    def token_text(self, token_id: int) -> str: ...


def completion_logprobs(
    tokenizer: TokenTexts, logprobs: Sequence[TokenLogprob], text_offset: int
) -> dict[str, Any]:
    """{tokens, token_logprobs, top_logprobs, text_offset}, offsets starting at `text_offset`.

    As vLLM: each `top_logprobs` entry holds the sampled token and the top-N (up to N + 1
    entries; `logprobs: 0` gives the sampled token's alone)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        token = tokenizer.token_text(lp.token_id)
        tokens.append(token)
        token_logprobs.append(_finite(lp.logprob))
        top = {token: _finite(lp.logprob)}
        top.update((tokenizer.token_text(t), _finite(v)) for t, v in lp.top)
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: TokenTexts, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_chat_entry(tokenizer, lp) for lp in logprobs]}


def _chat_entry(tokenizer: TokenTexts, lp: TokenLogprob) -> dict[str, Any]:
    entry = _token_entry(tokenizer, lp.token_id, lp.logprob)
    entry["top_logprobs"] = [_token_entry(tokenizer, t, v) for t, v in lp.top]
    return entry


def _token_entry(tokenizer: TokenTexts, token_id: int, logprob: float) -> dict[str, Any]:
    token = tokenizer.token_text(token_id)
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}
