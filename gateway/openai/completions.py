"""POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.core import GatewayCore
from gateway.errors import invalid
from gateway.openai.choices import ChoiceResult, collect, usage_body
from gateway.openai.common import ResponseMeta, check_model, open_runs
from gateway.openai.logprobs import (
    completion_logprobs,
    echoed_prompt_logprobs,
    join_logprobs,
    prompt_logprobs_body,
)
from gateway.openai.protocol import CompletionRequest
from gateway.openai.streaming import DONE, merged, sse, start_sse, unless_disconnected
from gateway.request_run import RequestRun
from gateway.schema import GenerateRequest, Prompt, TextPrompt, TokenLogprob, TokenPrompt


async def create_completion(
    core: GatewayCore, body: CompletionRequest, request: Request
) -> Response:
    check_model(core, body.model)
    params = body.to_params(core.sampling_defaults)
    prompts = _prompts(body.prompt, body.add_special_tokens)
    keep = body.truncate_prompt_tokens
    runs = await open_runs(
        core, [GenerateRequest(p, params, truncate_prompt_tokens=keep) for p in prompts]
    )
    meta = ResponseMeta.new("cmpl", core.config.model_name)
    echoes = [
        _echo_text(core, p, r, truncated=keep is not None) if body.echo else ""
        for p, r in zip(prompts, runs, strict=True)
    ]
    shape = _Shape(
        as_ids=body.return_tokens_as_token_ids,
        prompt_logprobs=body.prompt_logprobs is not None,
        echo_logprobs=body.echo_logprobs,
    )
    if body.stream:
        events = _events(core, meta, runs, echoes, body.include_usage, body.continuous_usage,
                         shape)  # fmt: skip
        return await start_sse(request, events)
    results = await unless_disconnected(request, collect(merged(runs), params.n, len(runs)))
    return JSONResponse(_response_body(core, meta, runs, echoes, results, shape))


@dataclass(slots=True, frozen=True)
class _Shape:
    """What the choices carry beyond text: tokens named by id, vLLM's prompt_logprobs (asked
    for), and under echo with logprobs the prompt's tokens in the logprobs."""

    as_ids: bool = False
    prompt_logprobs: bool = False
    echo_logprobs: bool = False

    def logprobs(
        self,
        core: GatewayCore,
        run: RequestRun,
        logprobs: Sequence[TokenLogprob],
        offset: int,
        prompt_logprobs: Sequence[TokenLogprob] | None = None,
        first: bool = True,
    ) -> dict[str, Any]:
        """The completion logprobs of (a delta of) one choice, from text offset `offset`; under
        echo, a choice's first part starts with the prompt's tokens."""
        tail = completion_logprobs(core.tokenizer, logprobs, offset, self.as_ids)
        if not (self.echo_logprobs and first):
            return tail
        head = echoed_prompt_logprobs(core.tokenizer, run.prompt_ids, prompt_logprobs, self.as_ids)
        return join_logprobs(head, tail)


def _prompts(
    prompt: str | list[str] | list[int] | list[list[int]], add_special_tokens: bool
) -> list[Prompt]:
    if isinstance(prompt, str):
        return [TextPrompt(prompt, add_special_tokens)]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [TokenPrompt(tuple(prompt))]  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in prompt):
        return [TextPrompt(p, add_special_tokens) for p in prompt]  # type: ignore[misc]
    return [TokenPrompt(tuple(p)) for p in prompt]  # type: ignore[arg-type]


def _echo_text(core: GatewayCore, prompt: Prompt, run: RequestRun, *, truncated: bool) -> str:
    """The prompt as the model saw it: its text, or its tokens decoded once truncated."""
    if isinstance(prompt, TextPrompt) and not truncated:
        return prompt.text
    return core.tokenizer.decode(run.prompt_ids, skip_special_tokens=False)


def _choice_body(
    core: GatewayCore, run: RequestRun, c: ChoiceResult, echo: str, shape: _Shape
) -> dict[str, Any]:
    return {
        "index": c.index,
        "text": echo + c.text,
        "logprobs": shape.logprobs(core, run, c.logprobs, len(echo), c.prompt_logprobs)
        if run.params.logprobs is not None
        else None,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "prompt_logprobs": prompt_logprobs_body(core.tokenizer, c.prompt_logprobs)
        if shape.prompt_logprobs
        else None,
    }


def _response_body(
    core: GatewayCore,
    meta: ResponseMeta,
    runs: Sequence[RequestRun],
    echoes: Sequence[str],
    results: Sequence[ChoiceResult],
    shape: _Shape,
) -> dict[str, Any]:
    n = runs[0].params.n
    choices = [
        _choice_body(core, runs[c.index // n], c, echoes[c.index // n], shape) for c in results
    ]
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_body(runs),
    }


async def _events(
    core: GatewayCore,
    meta: ResponseMeta,
    runs: Sequence[RequestRun],
    echoes: Sequence[str],
    include_usage: bool,
    continuous_usage: bool,
    shape: _Shape,
) -> AsyncIterator[str]:
    n = runs[0].params.n
    want_logprobs = runs[0].params.logprobs is not None
    # vLLM refuses prompt_logprobs when streaming; here each choice's first chunk has them.
    prompt_pending = set(range(n * len(runs))) if shape.prompt_logprobs else set()
    offsets: dict[int, int] = {}  # choice index -> characters sent so far
    head = {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
    }
    async for run_index, delta in merged(runs):
        index = run_index * n + delta.index
        text = delta.text
        first = index not in offsets
        if first:
            text = echoes[run_index] + text
            offsets[index] = len(echoes[run_index])
        with_prompt = index in prompt_pending
        if not (
            text or delta.finish_reason or (want_logprobs and (delta.token_ids or first))
            or with_prompt
        ):  # fmt: skip
            continue
        logprobs = None
        if want_logprobs:
            logprobs = shape.logprobs(
                core, runs[run_index], delta.logprobs or (), offsets[index],
                delta.prompt_logprobs, first,
            )  # fmt: skip
        offsets[index] += len(delta.text)
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        if with_prompt:
            prompt_pending.discard(index)
            choice["prompt_logprobs"] = prompt_logprobs_body(core.tokenizer, delta.prompt_logprobs)
        yield sse(
            {**head, "choices": [choice], "usage": usage_body(runs) if continuous_usage else None}
        )
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage_body(runs)})
    yield DONE
