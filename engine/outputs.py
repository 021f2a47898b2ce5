"""What the engine hands back: incremental per step, aggregated by the offline API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TokenLogprob(NamedTuple):
    """Logprob info at one position: the logprob of the token there (sampled, or the prompt's
    next token), its 1-based rank in the distribution (None where not known, e.g. a first token
    imported from a prefill worker), and the top-N as {token_id: logprob}, best first."""

    logprob: float
    top: dict[int, float]
    rank: int | None = None


@dataclass(slots=True)
class Logprob:
    """vLLM's `Logprob`: one token's logprob, its 1-based rank and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's per-position shape: {token_id: Logprob} holding the position's token and the top-N.
# Prompt logprobs are one per prompt token, the first None (nothing predicts it).
PositionLogprobs = dict[int, Logprob]
PromptLogprobs = list[PositionLogprobs | None]


@dataclass(slots=True)
class PrefillResult:
    """A finished prefill-only request: its KV stays in these (held) blocks."""

    block_ids: list[int]
    num_prompt_tokens: int
    first_token: int
    first_logprob: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """Incremental: the tokens a request gained in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "prefill" | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    prefill: PrefillResult | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # With params.prompt_logprobs: prompt positions 1.. (entry i: the logprob of prompt token
    # i + 1 given those before it), once, on the output that carries the first token.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class LLMOutput:
    """vLLM-shaped result of `LLM.generate` for one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (the most of its choices)
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs
