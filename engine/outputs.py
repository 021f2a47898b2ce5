"""What the engine hands back: incremental per step, aggregated by the offline API."""

from __future__ import annotations

from dataclasses import dataclass, field

# One sampled token's logprob info: (sampled logprob, {token_id: logprob} of the top-N).
TokenLogprob = tuple[float, dict[int, float]]


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


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
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
