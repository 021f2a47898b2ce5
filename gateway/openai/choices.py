"""Accumulating deltas into whole choices (non-streaming answers) and usage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.request_run import RequestRun
from gateway.schema import ChoiceDelta, TokenLogprob


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or ())
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


async def collect(
    deltas: AsyncIterator[tuple[int, ChoiceDelta]], n: int, num_runs: int
) -> list[ChoiceResult]:
    """Whole choices, indexed run * n + choice (vLLM's order for several prompts)."""
    results = [ChoiceResult(i) for i in range(n * num_runs)]
    async for run_index, delta in deltas:
        results[run_index * n + delta.index].add(delta)
    return results


def usage_body(runs: Sequence[RequestRun]) -> dict[str, Any]:
    prompt = sum(r.usage.prompt_tokens for r in runs)
    completion = sum(r.usage.completion_tokens for r in runs)
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = sum(r.usage.cached_tokens for r in runs)
    if cached:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body
