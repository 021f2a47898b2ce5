"""Logprobs in OpenAI's two shapes, completions (parallel lists) and chat (a list of entries), and
vLLM's `prompt_logprobs`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.schema import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf


def _finite(logprob: float) -> float:
    return logprob if logprob > _FLOOR else _FLOOR


class TokenTexts(Protocol):
    def token_text(self, token_id: int) -> str: ...


def _name(tokenizer: TokenTexts, token_id: int, as_ids: bool) -> str:
    """How a token is shown: its text, or vLLM's `token_id:N` (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_ids else tokenizer.token_text(token_id)


def completion_logprobs(
    tokenizer: TokenTexts,
    logprobs: Sequence[TokenLogprob],
    text_offset: int,
    as_ids: bool = False,
) -> dict[str, Any]:
    """{tokens, token_logprobs, top_logprobs, text_offset}, offsets starting at `text_offset`.

    As vLLM: each `top_logprobs` entry holds the sampled token and the top-N (up to N + 1
    entries; `logprobs: 0` gives the sampled token's alone). `as_ids`: tokens are named
    `token_id:N`; offsets still count the tokens' text."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        token = _name(tokenizer, lp.token_id, as_ids)
        tokens.append(token)
        token_logprobs.append(_finite(lp.logprob))
        top = {token: _finite(lp.logprob)}
        top.update((_name(tokenizer, t, as_ids), _finite(v)) for t, v in lp.top)
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(tokenizer.token_text(lp.token_id))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def echoed_prompt_logprobs(
    tokenizer: TokenTexts,
    prompt_ids: Sequence[int],
    prompt_logprobs: Sequence[TokenLogprob] | None,
    as_ids: bool = False,
) -> dict[str, Any]:
    """The prompt's part of completion logprobs under `echo` (OpenAI's legacy shape, as vLLM
    builds it): every prompt token, the first with a `null` logprob and `null` top entry (nothing
    predicts it), the others with their prompt logprob and top-N; offsets from 0 over the
    tokens' text."""
    given = list(prompt_logprobs or ())
    if len(given) != len(prompt_ids) - 1:
        raise ValueError(f"{len(given)} prompt logprobs for a prompt of {len(prompt_ids)} tokens")
    first = prompt_ids[0]
    out = {
        "tokens": [_name(tokenizer, first, as_ids)],
        "token_logprobs": [None],
        "top_logprobs": [None],
        "text_offset": [0],
    }
    rest = completion_logprobs(tokenizer, given, len(tokenizer.token_text(first)), as_ids)
    for key, values in rest.items():
        out[key].extend(values)
    return out


def join_logprobs(head: dict[str, Any] | None, tail: dict[str, Any]) -> dict[str, Any]:
    """`head`'s lists followed by `tail`'s (None: `tail` alone)."""
    if head is None:
        return tail
    return {key: [*head[key], *tail[key]] for key in tail}


def chat_logprobs(
    tokenizer: TokenTexts, logprobs: Sequence[TokenLogprob], as_ids: bool = False
) -> dict[str, Any]:
    return {"content": [_chat_entry(tokenizer, lp, as_ids) for lp in logprobs]}


def _chat_entry(tokenizer: TokenTexts, lp: TokenLogprob, as_ids: bool) -> dict[str, Any]:
    entry = _token_entry(tokenizer, lp.token_id, lp.logprob, as_ids)
    entry["top_logprobs"] = [_token_entry(tokenizer, t, v, as_ids) for t, v in lp.top]
    return entry


def _token_entry(
    tokenizer: TokenTexts, token_id: int, logprob: float, as_ids: bool
) -> dict[str, Any]:
    token = _name(tokenizer, token_id, as_ids)
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def prompt_logprobs_body(
    tokenizer: TokenTexts, logprobs: Sequence[TokenLogprob] | None
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing predicts it), then per
    prompt token {token_id: {logprob, rank, decoded_token}} holding that token first and the
    top-N ranked 1, 2, ... (keys are token ids as JSON strings)."""
    body: list[dict[str, dict[str, Any]] | None] = [None]
    for lp in logprobs or ():
        entry = {str(lp.token_id): _vllm_logprob(tokenizer, lp.token_id, lp.logprob, lp.rank)}
        for rank, (token_id, logprob) in enumerate(lp.top, start=1):
            entry[str(token_id)] = _vllm_logprob(tokenizer, token_id, logprob, rank)
        body.append(entry)
    return body


def _vllm_logprob(
    tokenizer: TokenTexts, token_id: int, logprob: float, rank: int | None
) -> dict[str, Any]:
    return {
        "logprob": _finite(logprob),
        "rank": rank,
        "decoded_token": tokenizer.token_text(token_id),
    }
