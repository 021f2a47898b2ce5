"""Runs one choice on the workers: maybe a prefill, then a decode stream, with clean-up.

Conditional disaggregation: prompts shorter than `min_prefill_tokens`, or no healthy prefill
worker, or a prefill worker that is full, go to the decode worker without a KV handle (it
prefills locally). A prefill worker found unreachable is marked failed and the prompt is routed
to another prefill worker once before falling back the same way. Before the first token, a
decode that fails because its worker is gone or the KV handle went stale is retried once with
local prefill.

Clean-up rule: unless the decode stream ended with a finish reason, the decode worker gets an
Abort and the prefill worker a Release (both idempotent), whatever ended the stream: a stop
string, a client cancel, a deadline or an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import grpc

from gateway.errors import ErrorKind, GatewayError
from gateway.router import Choice, Route
from gateway.worker_client import DecodeChunk, KVLease, SamplingRequest, WorkerRpcError
from gateway.worker_pool import DECODE, PREFILL, Worker, WorkerPool

log = logging.getLogger(__name__)

_FALLBACK_PREFILL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_RETRY_DECODE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
_ERROR_KIND = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE,
}

_PREFILL_ATTEMPTS = 2  # the router's choice, then one other worker if the first is gone
Spawn = Callable[[Coroutine[Any, Any, Any]], None]


@dataclass(slots=True, frozen=True)
class DispatchSettings:
    min_prefill_tokens: int
    prefill_timeout_s: float
    control_timeout_s: float
    # A Prefill unanswered this long makes the gateway ask the worker for its load, with this
    # deadline; a worker that cannot answer that (frozen, wedged) has its Prefill abandoned and
    # the prompt is prefilled on the decode worker instead.
    prefill_progress_s: float = 1.0


class _WorkerGone(Exception):
    """The chosen prefill worker is unavailable (already marked failed): choose another."""


@dataclass(slots=True)
class _Prefilled:
    worker: Worker
    lease: KVLease


class ChoiceDispatch:
    """One choice of one request. `request_id` and `transfer_id` are the gateway's ids."""

    def __init__(
        self,
        pool: WorkerPool,
        settings: DispatchSettings,
        spawn: Spawn,
        request_id: str,
        transfer_id: str,
        prompt_ids: list[int],
        sampling: SamplingRequest,
        deadline: float,  # time.monotonic() by which the whole choice must be done
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._spawn = spawn
        self.request_id = request_id
        self.transfer_id = transfer_id
        self._prompt_ids = prompt_ids
        self._sampling = sampling
        self._deadline = deadline
        self.prefilled_on: str | None = None  # address of the prefill worker used, if any

    async def chunks(self) -> AsyncIterator[DecodeChunk]:
        """The decode worker's chunks, in order, ending with the one with a finish reason."""
        got_tokens = False
        for attempt in (0, 1):
            decode = self._pool.pick(DECODE, Route(self._prompt_ids, self._sampling.max_tokens))
            if decode is None:
                raise GatewayError(ErrorKind.UNAVAILABLE, "no healthy decode worker")
            prefilled = await self._prefill() if attempt == 0 else None
            # A retry has its own id on the worker: the Abort that cleans up the first attempt
            # runs in the background and must not hit the retry on the same worker.
            request_id = self.request_id if attempt == 0 else f"{self.request_id}-retry"
            try:
                async for chunk in self._decode(decode, prefilled, request_id):
                    got_tokens = got_tokens or bool(chunk.token_ids)
                    yield chunk
                return
            except WorkerRpcError as exc:
                if got_tokens or attempt == 1 or exc.code not in _RETRY_DECODE:
                    raise _gateway_error(exc) from exc
                log.warning("retrying %s with local prefill: %s", self.request_id, exc)

    async def _prefill(self) -> _Prefilled | None:
        """Prefill on the router's choice; a worker found gone is dropped and the prompt goes
        to the next choice once. None: prefill on the decode worker instead."""
        if len(self._prompt_ids) < self._settings.min_prefill_tokens:
            return None
        route = Route(self._prompt_ids, self._sampling.max_tokens)
        tried: list[Worker] = []
        for _ in range(_PREFILL_ATTEMPTS):
            choice = self._pool.pick_prefill(route, exclude=tried)
            if choice is None:
                return None
            try:
                return await self._prefill_on(choice)
            except _WorkerGone:
                tried.append(choice.worker)
        return None

    async def _prefill_on(self, choice: Choice) -> _Prefilled | None:
        worker = choice.worker
        timeout = min(self._settings.prefill_timeout_s, self._remaining())
        worker.in_flight += 1
        try:
            lease = await self._prefill_while_alive(worker, timeout)
        except WorkerRpcError as exc:
            self._release(worker)  # the lease may exist even though the answer was lost
            return self._prefill_failed(worker, exc)
        except asyncio.CancelledError:
            self._release(worker)
            raise
        finally:
            worker.in_flight -= 1
            self._pool.prefill_done(choice)
        self.prefilled_on = worker.address
        return _Prefilled(worker, lease)

    async def _prefill_while_alive(self, worker: Worker, timeout: float) -> KVLease:
        """The Prefill call, abandoned (UNAVAILABLE) if it is unanswered for
        `prefill_progress_s` and the worker then cannot answer GetLoad within as long."""
        call = asyncio.ensure_future(
            worker.client.prefill(
                self.transfer_id, self.request_id, self._prompt_ids, self._sampling, timeout
            )
        )
        progress_s = self._settings.prefill_progress_s
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=progress_s)
                if done:
                    return call.result()
                try:
                    await worker.client.get_load(PREFILL, progress_s)
                except WorkerRpcError as exc:
                    raise WorkerRpcError(
                        worker.address,
                        "Prefill",
                        grpc.StatusCode.UNAVAILABLE,
                        f"no answer for {progress_s:g} s and GetLoad failed ({exc.code.name})",
                    ) from exc
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    def _prefill_failed(self, worker: Worker, exc: WorkerRpcError) -> None:
        if exc.code not in _FALLBACK_PREFILL:
            raise _gateway_error(exc) from exc
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            self._pool.mark_failed(worker, str(exc))
            log.warning("prefill of %s re-routed: %s", self.request_id, exc)
            raise _WorkerGone from exc
        log.warning(
            "prefill of %s failed, prefilling on the decode worker: %s", self.request_id, exc
        )
        return None

    async def _decode(
        self, worker: Worker, prefilled: _Prefilled | None, request_id: str
    ) -> AsyncIterator[DecodeChunk]:
        lease = prefilled.lease if prefilled else None
        call = worker.client.decode(
            request_id, self._prompt_ids, self._sampling, lease, self._remaining()
        )
        worker.in_flight += 1
        finished = False
        prompt_logprobs = lease.prompt_logprobs if lease else None
        try:
            async for chunk in call.chunks():
                finished = chunk.finish_reason is not None
                if prompt_logprobs is not None:  # computed by the prefill worker
                    chunk, prompt_logprobs = replace(chunk, prompt_logprobs=prompt_logprobs), None
                yield chunk
                if finished:
                    return
            raise WorkerRpcError(
                worker.address,
                "Decode",
                grpc.StatusCode.INTERNAL,
                "the stream ended without a finish reason",
            )
        except WorkerRpcError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                self._pool.mark_failed(worker, str(exc))
            raise
        finally:
            worker.in_flight -= 1
            if not finished:
                call.cancel()
                self._abort(worker, request_id)
                if prefilled is not None:
                    self._release(prefilled.worker)

    def _abort(self, worker: Worker, request_id: str) -> None:
        timeout = self._settings.control_timeout_s
        self._spawn(_quietly(worker.client.abort(request_id, timeout), "Abort"))

    def _release(self, worker: Worker) -> None:
        timeout = self._settings.control_timeout_s
        self._spawn(_quietly(worker.client.release(self.transfer_id, timeout), "Release"))

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise GatewayError(ErrorKind.DEADLINE, "the request ran past its deadline")
        return left


async def _quietly(call: Coroutine[Any, Any, Any], what: str) -> None:
    """Clean-up calls are best effort: the worker also frees on lease expiry / stream cancel."""
    try:
        await call
    except WorkerRpcError as exc:
        log.info("%s failed (the worker cleans up on its own): %s", what, exc)


def _gateway_error(exc: WorkerRpcError) -> GatewayError:
    kind = _ERROR_KIND.get(exc.code, ErrorKind.INTERNAL)
    return GatewayError(kind, f"worker {exc.method} failed ({exc.code.name}): {exc.details}")
