"""One admitted request: its n choices running concurrently, merged into one delta stream."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from gateway.choice_output import ChoiceOutput
from gateway.dispatch import ChoiceDispatch, DispatchSettings
from gateway.errors import ErrorKind, GatewayError
from gateway.metrics import GatewayMetrics
from gateway.schema import ChoiceDelta, GenerationParams, Usage
from gateway.tokenizer import GatewayTokenizer
from gateway.worker_client import SamplingRequest
from gateway.worker_pool import WorkerPool

log = logging.getLogger(__name__)
_INT64 = 2**64


class RunOwner(Protocol):
    """What a run needs from the gateway core that opened it (GatewayCore is one)."""

    tokenizer: GatewayTokenizer
    pool: WorkerPool
    metrics: GatewayMetrics
    dispatch_settings: DispatchSettings

    def spawn(self, coro: Any) -> None:
        """Run a clean-up call in the background, past the request's cancellation."""
        ...

    def forget(self, run: RequestRun) -> None:
        """The run has ended: drop it from the requests in flight."""
        ...


class RequestRun:
    """Iterate `stream()` once; `abort()` ends it early; `close()` always runs at the end.

    Each choice is its own worker request (`{request_id}-{index}`, own transfer id, seed + index)
    feeding one queue; the stream ends when every choice has a finish reason.
    """

    def __init__(
        self,
        core: RunOwner,
        request_id: str,
        prompt_ids: list[int],
        params: GenerationParams,
        max_tokens: int,
        deadline: float,
    ) -> None:
        self._core = core
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self._deadline = deadline
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self._outputs = [
            ChoiceOutput(i, core.tokenizer, prompt_ids, params) for i in range(params.n)
        ]
        self._queue: asyncio.Queue[ChoiceDelta | GatewayError] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at = time.monotonic()
        self._first_token_at: float | None = None
        self._last_token_at: list[float | None] = [None] * params.n
        # Per choice: when it was dispatched, its first token, and tokens after the first.
        self._dispatched_at: list[float | None] = [None] * params.n
        self._choice_first_at: list[float | None] = [None] * params.n
        self._tokens_after_first = [0] * params.n
        self._closed = False

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        self._start()
        remaining = len(self._outputs)
        try:
            while remaining:
                item = await self._queue.get()
                if isinstance(item, GatewayError):
                    self._core.metrics.failure.labels(item.kind.value).inc()
                    raise item
                remaining -= item.finish_reason is not None
                self._observe(item)
                yield item
        finally:
            self.close()

    def abort(self) -> None:
        """Stop every unfinished choice; each gets a final delta with finish reason "abort"."""
        for output, task in zip(self._outputs, self._tasks, strict=False):
            if not output.finished:
                task.cancel()
                self._queue.put_nowait(output.abort())

    def close(self) -> None:
        """Cancel what still runs (its workers get Abort/Release) and record the request."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for output in self._outputs:
            if not output.finished:
                self._observe(output.abort())
        self._core.forget(self)
        self._core.metrics.e2e.observe(time.monotonic() - self._started_at)

    def _start(self) -> None:
        if self._tasks:
            raise RuntimeError("RequestRun.stream() can be iterated only once")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_choice(i)) for i in range(len(self._outputs))]

    async def _run_choice(self, index: int) -> None:
        output = self._outputs[index]
        dispatch = self._dispatch(index)
        self._dispatched_at[index] = time.monotonic()
        try:
            async with aclosing(dispatch.chunks()) as chunks:
                async for chunk in chunks:
                    delta = output.on_chunk(chunk.token_ids, chunk.logprobs, chunk.finish_reason)
                    delta.prompt_logprobs = chunk.prompt_logprobs
                    if chunk.cached_tokens is not None:
                        self.usage.cached_tokens = max(
                            self.usage.cached_tokens, chunk.cached_tokens
                        )
                    if delta.token_ids or delta.text or delta.finish_reason:
                        self._queue.put_nowait(delta)
                    if output.finished:
                        break
        except GatewayError as exc:
            self._queue.put_nowait(exc)
        except Exception as exc:  # a bug, not a worker error: report it, keep serving
            log.exception("choice %d of %s failed", index, self.request_id)
            self._queue.put_nowait(GatewayError(ErrorKind.INTERNAL, f"internal error: {exc}"))
        finally:
            where = "remote" if dispatch.prefilled_on else "local"
            self._core.metrics.disaggregated.labels(where).inc()

    def _dispatch(self, index: int) -> ChoiceDispatch:
        seed = self.params.seed
        if seed is not None:  # distinct, reproducible seeds per choice, wrapped to int64
            seed = (seed + index + 2**63) % _INT64 - 2**63
        return ChoiceDispatch(
            pool=self._core.pool,
            settings=self._core.dispatch_settings,
            spawn=self._core.spawn,
            request_id=f"{self.request_id}-{index}",
            transfer_id=f"{self.request_id}-{index}-{uuid.uuid4().hex[:12]}",
            prompt_ids=self.prompt_ids,
            sampling=SamplingRequest(self.params, self.max_tokens, seed),
            deadline=self._deadline,
        )

    def _observe(self, delta: ChoiceDelta) -> None:
        metrics = self._core.metrics
        if delta.token_ids:
            now = time.monotonic()
            if self._first_token_at is None:
                self._first_token_at = now
                metrics.ttft.observe(now - self._started_at)
            i = delta.index
            last = self._last_token_at[i]
            if last is not None:
                metrics.itl.observe(now - last)
            self._last_token_at[i] = now
            if self._choice_first_at[i] is None:
                self._choice_first_at[i] = now
                self._tokens_after_first[i] += len(delta.token_ids) - 1
                dispatched = self._dispatched_at[i]
                if dispatched is not None:
                    metrics.prefill_time.observe(now - dispatched)
            else:
                self._tokens_after_first[i] += len(delta.token_ids)
            metrics.generation_tokens.inc(len(delta.token_ids))
            self.usage.completion_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            metrics.success.labels(delta.finish_reason).inc()
            self._observe_decode(delta.index)

    def _observe_decode(self, i: int) -> None:
        first, last = self._choice_first_at[i], self._last_token_at[i]
        if first is None or last is None:
            return  # no token: nothing was decoded
        metrics = self._core.metrics
        metrics.decode_time.observe(last - first)
        if self._tokens_after_first[i] > 0:
            metrics.tpot.observe((last - first) / self._tokens_after_first[i])
