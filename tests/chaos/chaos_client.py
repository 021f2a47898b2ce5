"""An HTTP client for the chaos tests: every call is bounded and says how the request ended.

A request ends one of three ways:
- "ok": 200 with a finish reason (and `data: [DONE]` when streamed);
- "error": a clean error -- an HTTP error status with OpenAI's error body, or, once a stream
  has started, an SSE error chunk followed by `data: [DONE]`;
- "broken": anything else (a hang past the timeout, a stream cut without [DONE], a body that
  is not an error, a dropped connection). No chaos test accepts "broken".
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# Long enough to be prefilled on a prefill worker (the gateway's --min-prefill-tokens is 16).
LONG_PROMPT = "the quick brown fox jumps over the lazy dog"  # 30 tokens of the tiny tokenizer
SHORT_PROMPT = "hello world"  # prefilled on the decode worker


@dataclass
class Outcome:
    status: int | None = None
    text: str = ""
    num_chunks: int = 0  # SSE data chunks with text
    finish_reasons: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None  # OpenAI error object, from the body or an SSE chunk
    done: bool = False  # saw data: [DONE]
    exception: str | None = None  # a transport failure or timeout on our side
    headers: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    ended_at: float = 0.0  # time.monotonic() when the request ended
    disconnected: bool = False  # we hung up on purpose

    @property
    def kind(self) -> str:
        if self.exception is not None:
            return "broken"
        if self.status == 200 and self.error is None and self.finish_reasons:
            return "ok"
        if self.status is not None and self.status >= 400 and self.error is not None:
            return "error"
        if self.status == 200 and self.error is not None and self.done:
            return "error"
        return "broken"

    def describe(self) -> str:
        return (f"{self.kind}: status={self.status} chunks={self.num_chunks} "
                f"finish={self.finish_reasons} done={self.done} error={self.error} "
                f"exception={self.exception} after {self.elapsed_s:.2f}s")  # fmt: skip


def completion_body(prompt: str = LONG_PROMPT, max_tokens: int = 8, **extra: Any) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}


def _parse_sse_line(line: str, out: Outcome) -> None:
    if not line.startswith("data: "):
        return
    data = line[len("data: ") :]
    if data == "[DONE]":
        out.done = True
        return
    payload = json.loads(data)
    if "error" in payload:
        out.error = payload["error"]
        return
    for choice in payload.get("choices", []):
        piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        out.text += piece
        out.num_chunks += bool(piece)
        if choice.get("finish_reason"):
            out.finish_reasons.append(choice["finish_reason"])


async def request(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    *,
    timeout_s: float = 60.0,
    first_chunk: asyncio.Event | None = None,
    disconnect_after_chunks: int | None = None,
) -> Outcome:
    """POST `body` (streamed when body["stream"]) and report how it ended, within `timeout_s`.

    `first_chunk` is set once a streamed text chunk arrived; `disconnect_after_chunks` hangs up
    after that many text chunks. Cancelling the task also hangs up (a client disconnect)."""
    out = Outcome()
    start = time.monotonic()
    try:
        await asyncio.wait_for(
            _run(client, url, body, out, first_chunk, disconnect_after_chunks), timeout_s
        )
    except TimeoutError:
        out.exception = f"no answer within {timeout_s}s (hang)"
    except asyncio.CancelledError:
        out.disconnected = True
        raise
    except (httpx.HTTPError, ValueError) as exc:
        out.exception = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended_at = time.monotonic()
        out.elapsed_s = out.ended_at - start
    return out


async def _run(client, url, body, out, first_chunk, disconnect_after_chunks) -> None:
    async with client.stream("POST", url, json=body) as resp:
        out.status = resp.status_code
        out.headers = dict(resp.headers)
        if resp.status_code != 200 or not body.get("stream"):
            raw = await resp.aread()
            payload = json.loads(raw) if raw else {}
            if resp.status_code != 200:
                out.error = payload.get("error") if isinstance(payload, dict) else None
                return
            for choice in payload.get("choices", []):
                out.text += choice.get("text") or (choice.get("message") or {}).get("content") or ""
                if choice.get("finish_reason"):
                    out.finish_reasons.append(choice["finish_reason"])
            return
        async for line in resp.aiter_lines():
            _parse_sse_line(line, out)
            if out.num_chunks and first_chunk is not None:
                first_chunk.set()
            if disconnect_after_chunks is not None and out.num_chunks >= disconnect_after_chunks:
                out.disconnected = True
                return  # leaving the block closes the connection mid-stream
        if not out.done:
            raise ValueError("the stream ended without data: [DONE]")


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {"ok": 0, "error": 0, "broken": 0}
    for out in outcomes:
        counts[out.kind] += 1
    return counts


def new_client(**kwargs: Any) -> httpx.AsyncClient:
    """No pooling between requests, so a hang-up really closes that request's connection."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits, **kwargs)
