"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.core import GatewayCore
from gateway.openai.choices import ChoiceResult, collect, usage_body
from gateway.openai.common import ResponseMeta, check_model, open_runs
from gateway.openai.logprobs import chat_logprobs, prompt_logprobs_body
from gateway.openai.protocol import ChatCompletionRequest
from gateway.openai.streaming import DONE, merged, sse, start_sse, unless_disconnected
from gateway.openai.tools import ToolPlan, call_objects, plan_tools
from gateway.request_run import RequestRun
from gateway.schema import GenerateRequest


async def create_chat_completion(
    core: GatewayCore, body: ChatCompletionRequest, request: Request
) -> Response:
    check_model(core, body.model)
    config = core.config
    plan = plan_tools(
        body.tools,
        body.tool_choice,
        body.parallel_tool_calls,
        config.tool_call_parser,
        config.enable_auto_tool_choice,
    )
    params = body.to_params(plan.constraint(), core.limits.max_logprobs, core.sampling_defaults)
    prompt = body.chat_prompt(plan.tools)
    generate = GenerateRequest(prompt, params, truncate_prompt_tokens=body.truncate_prompt_tokens)
    runs = await open_runs(core, [generate])
    meta = ResponseMeta.new("chatcmpl", core.config.model_name)
    if body.stream:
        events = _events(core, meta, runs[0], plan, body.include_usage, body.continuous_usage,
                         as_ids=body.return_tokens_as_token_ids)  # fmt: skip
        return await start_sse(request, events)
    results = await unless_disconnected(request, collect(merged(runs), params.n, 1))
    return JSONResponse(
        _response_body(core, meta, runs[0], plan, results, body.return_tokens_as_token_ids)
    )


def _message(
    plan: ToolPlan, text: str, finish_reason: str | None
) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice, and its finish reason (tool_calls if any)."""
    if not plan.parses or finish_reason != "stop":
        return {"role": "assistant", "content": text}, finish_reason
    parsed = plan.parse(text)
    if not parsed.calls:
        return {"role": "assistant", "content": parsed.content}, finish_reason
    calls = [{k: v for k, v in c.items() if k != "index"} for c in call_objects(parsed)]
    return {"role": "assistant", "content": parsed.content, "tool_calls": calls}, "tool_calls"


def _response_body(
    core: GatewayCore,
    meta: ResponseMeta,
    run: RequestRun,
    plan: ToolPlan,
    results: Sequence[ChoiceResult],
    as_ids: bool = False,
) -> dict[str, Any]:
    want_logprobs = run.params.logprobs is not None
    choices = []
    for c in results:
        message, finish_reason = _message(plan, c.text, c.finish_reason)
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": chat_logprobs(core.tokenizer, c.logprobs, as_ids)
                if want_logprobs
                else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_body([run]),
        # vLLM's: one list for the request (every choice has the same prompt)
        "prompt_logprobs": prompt_logprobs_body(core.tokenizer, results[0].prompt_logprobs)
        if run.params.prompt_logprobs is not None
        else None,
    }


async def _events(
    core: GatewayCore,
    meta: ResponseMeta,
    run: RequestRun,
    plan: ToolPlan,
    include_usage: bool,
    continuous_usage: bool,
    as_ids: bool = False,
) -> AsyncIterator[str]:
    """Per choice: a role chunk when its first delta arrives, then content, then the finish.
    When the text becomes tool calls, it is held back and the calls come in the last delta."""
    want_logprobs = run.params.logprobs is not None
    head = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
    }
    started: set[int] = set()
    held: dict[int, str] = {}  # choice -> text held back for tool-call parsing
    async for _, delta in merged([run]):
        if delta.index not in started:
            started.add(delta.index)
            role = {
                "index": delta.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            chunk = {**head, "choices": [role], "usage": _usage(run, continuous_usage)}
            if run.params.prompt_logprobs is not None and len(started) == 1:
                # vLLM refuses them streamed; here the first chunk has them, top-level as in
                # the non-streamed response.
                prompt = prompt_logprobs_body(core.tokenizer, delta.prompt_logprobs)
                chunk["prompt_logprobs"] = prompt
            yield sse(chunk)
        content: dict[str, Any] = {"content": delta.text} if delta.text else {}
        finish_reason = delta.finish_reason
        if plan.parses:
            held[delta.index] = held.get(delta.index, "") + delta.text
            content = {}
            if finish_reason is not None:
                content, finish_reason = _final_delta(plan, held.pop(delta.index), finish_reason)
        if not (content or finish_reason or (want_logprobs and delta.token_ids)):
            continue
        choice = {
            "index": delta.index,
            "delta": content,
            "logprobs": chat_logprobs(core.tokenizer, delta.logprobs or (), as_ids)
            if want_logprobs
            else None,
            "finish_reason": finish_reason,
            "stop_reason": delta.stop_reason,
        }
        yield sse({**head, "choices": [choice], "usage": _usage(run, continuous_usage)})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage_body([run])})
    yield DONE


def _final_delta(plan: ToolPlan, text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    message, finish_reason = _message(plan, text, finish_reason)
    delta: dict[str, Any] = {}
    if message.get("content"):
        delta["content"] = message["content"]
    if "tool_calls" in message:
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    return delta, finish_reason  # type: ignore[return-value]


def _usage(run: RequestRun, continuous: bool) -> dict[str, Any] | None:
    """stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    return usage_body([run]) if continuous else None
