"""One streaming request to an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (COMPLETIONS_ENDPOINT, CHAT_ENDPOINT)


@dataclass(slots=True, frozen=True)
class RequestInput:
    api_url: str  # base URL + endpoint
    model: str
    prompt: str
    prompt_len: int
    output_len: int
    chat: bool
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    extra_body: Mapping[str, Any] | None = None  # more body fields, e.g. llama.cpp's cache_prompt


@dataclass(slots=True)
class RequestOutput:
    success: bool = False
    error: str = ""
    generated_text: str = ""
    prompt_len: int = 0  # from the server's usage when it reports one, else the dataset's count
    output_tokens: int | None = None  # from the server's usage; None when not reported
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    ttft: float = 0.0  # seconds to the first streamed text (to the end when no text came)
    itl: list[float] = field(default_factory=list)  # seconds between successive text chunks
    latency: float = 0.0  # seconds to the end of the stream
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each text chunk


def build_payload(req: RequestInput) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": req.model,
        "temperature": req.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    if req.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(req.extra_body or {})
    return payload


def headers(api_key: str | None) -> dict[str, str]:
    base = {"Content-Type": "application/json"}
    if api_key:
        base["Authorization"] = f"Bearer {api_key}"
    return base


def chunk_text(data: dict[str, Any], chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


class _StreamState:
    """Accumulates one response's SSE events into a RequestOutput."""

    def __init__(self, out: RequestOutput, chat: bool) -> None:
        self.out = out
        self.chat = chat
        self.last = out.start_time
        self.done = False

    def on_event(self, data: dict[str, Any], now: float) -> None:
        if "error" in data:
            raise RuntimeError(f"error event in stream: {json.dumps(data['error'])[:300]}")
        text = chunk_text(data, self.chat)
        if text:
            if not self.out.chunk_times:
                self.out.ttft = now - self.out.start_time
            else:
                self.out.itl.append(now - self.last)
            self.out.chunk_times.append(now)
            self.out.generated_text += text
            self.last = now
        usage = data.get("usage")
        if usage:
            self.out.prompt_len = int(usage.get("prompt_tokens") or self.out.prompt_len)
            self.out.output_tokens = int(usage.get("completion_tokens") or 0)

    def on_line(self, line: bytes, now: float) -> None:
        text = line.decode("utf-8").strip()
        if not text.startswith("data:"):
            return  # blank separators, comments (": ping"), event names
        body = text[len("data:") :].strip()
        if body == "[DONE]":
            self.done = True
            return
        self.on_event(json.loads(body), now)


async def _read_stream(resp: aiohttp.ClientResponse, state: _StreamState) -> None:
    buffer = b""
    async for piece in resp.content.iter_any():
        now = time.perf_counter()
        buffer += piece
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            state.on_line(line, now)
    if buffer.strip():
        state.on_line(buffer, time.perf_counter())


async def send_request(session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
    """Sends one streaming request; never raises for server or network trouble (see `.error`)."""
    out = RequestOutput(prompt_len=req.prompt_len, start_time=time.perf_counter())
    state = _StreamState(out, req.chat)
    answered = False  # whether a response head arrived: tells a refusal from a cut answer
    try:
        async with session.post(
            req.api_url, json=build_payload(req), headers=headers(req.api_key)
        ) as resp:
            answered = True
            if resp.status != 200:
                body = (await resp.text())[:300]
                out.error = f"HTTP {resp.status}: {body}"
            else:
                await _read_stream(resp, state)
    except Exception as exc:  # a benchmark records failures and goes on
        stage = "during the answer" if answered else "before any answer"
        out.error = f"{type(exc).__name__} {stage}: {exc}"
    out.latency = time.perf_counter() - out.start_time
    if out.error:
        return out
    if not out.chunk_times:
        out.ttft = out.latency
    out.success = True
    return out
