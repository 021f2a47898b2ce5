"""Helpers shared by the routes: merging runs, SSE framing, and noticing a client that left."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from gateway.errors import GatewayError
from gateway.openai.errors import error_body
from gateway.request_run import RequestRun
from gateway.schema import ChoiceDelta

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def merged(runs: Sequence[RequestRun]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """(run index, delta) from several runs as they arrive; closing it closes every run."""
    queue: asyncio.Queue[tuple[int, ChoiceDelta | GatewayError | None]] = asyncio.Queue()

    async def pump(i: int, run: RequestRun) -> None:
        try:
            async for delta in run.stream():
                queue.put_nowait((i, delta))
            queue.put_nowait((i, None))
        except GatewayError as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.get_running_loop().create_task(pump(i, r)) for i, r in enumerate(runs)]
    try:
        remaining = len(runs)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, GatewayError):
                raise item
            if item is None:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            run.close()


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        watch.cancel()
        if not task.done():
            # Let the work unwind before the caller closes what it was using (closing an async
            # generator whose anext() is still running raises RuntimeError).
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def start_sse(request: Request, events: AsyncIterator[str]) -> Response:
    """Wait for the first event before answering, so early errors still get a status code;
    after that, an error becomes an error event followed by [DONE]."""
    try:
        first: str | None = await unless_disconnected(request, anext(events))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        except GatewayError as exc:
            yield sse(error_body(exc))
            yield DONE
        finally:
            await events.aclose()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
