"""EngineLoop: one background thread owns an LLMEngine and steps it while there is work.

Everything else talks to the engine through thread-safe commands, each run on the engine thread
between two steps and answered through a `concurrent.futures.Future`:

    loop = EngineLoop(engine); loop.start()
    stream = RequestStream(asyncio.get_running_loop())
    await asyncio.wrap_future(loop.add_request("r1", ids, params, stream))
    async for out in stream: ...            # RequestOutputs of r1, until the finished one

A step that raises does not kill the thread: the requests in the engine are aborted, their
streams fail with EngineStepError, and the loop goes on with new work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from contract.errors import ErrorKind
from engine.engine import EngineStats
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.engine import ImportReservation, LLMEngine

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()
_ERROR_BACKOFF_S = 0.01  # after a failed step: do not spin on a persistent fault


class EngineStepError(RuntimeError):
    """The engine failed while running this request's step; the request was aborted."""

    kind = ErrorKind.INTERNAL


class EngineLoopStopped(RuntimeError):
    """The engine loop is not running (not started, or stopped)."""

    kind = ErrorKind.UNAVAILABLE


class RequestStream:
    """The outputs of one request, delivered from the engine thread to one asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Thread-safe; called by the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, *, name: str = "engine-loop", step_delay_s: float = 0.0
    ) -> None:
        if step_delay_s < 0:
            raise ValueError(f"step_delay_s must be >= 0, got {step_delay_s}")
        self.engine = engine
        self._step_delay_s = step_delay_s  # debug: sleep after every step (wide fault windows)
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched only by the engine thread
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._running = False
        self.num_step_errors = 0
        # Refreshed by the engine thread after every step and command batch; reading it never
        # waits for a (possibly long) step, so load reports stay prompt under heavy load.
        self.latest_stats: EngineStats = engine.stats()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, then end the thread."""
        if not self._running:
            return
        self._running = False
        self._commands.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- commands ------------------------------------------------------------------------------

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread between steps."""
        future: Future[T] = Future()
        if not self._running:
            future.set_exception(EngineLoopStopped("engine loop is not running"))
            return future
        self._commands.put((fn, future))
        return future

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: RequestStream,
        *,
        prefill_only: bool = False,
    ) -> Future[None]:
        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt_token_ids, params, prefill_only=prefill_only)
            self._streams[request_id] = stream

        return self.call(add)

    def abort(self, request_id: str) -> Future[None]:
        """Abort in any state (running, waiting, held, reserved); unknown ids are a no-op.
        A stream still attached receives the engine's "abort" output."""
        return self.call(lambda engine: engine.abort_request(request_id))

    def release_held(self, request_id: str) -> Future[None]:
        return self.call(lambda engine: engine.release_held(request_id))

    def reserve_import(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Future[ImportReservation]:
        return self.call(lambda engine: engine.reserve_import(request_id, prompt_token_ids, params))

    def commit_import(
        self,
        request_id: str,
        first_token: int,
        first_logprob: TokenLogprob | None,
        stream: RequestStream,
    ) -> Future[None]:
        def commit(engine: LLMEngine) -> None:
            engine.commit_import(request_id, first_token, first_logprob)
            self._streams[request_id] = stream

        return self.call(commit)

    def cancel_import(self, request_id: str) -> Future[None]:
        return self.call(lambda engine: engine.cancel_import(request_id))

    def stats(self) -> Future[EngineStats]:
        return self.call(lambda engine: engine.stats())

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("engine loop started")
        while True:
            idle = not self.engine.has_unfinished_requests()
            if not self._run_commands(block=idle):
                break
            if self.engine.has_unfinished_requests():
                self._step()
            self.latest_stats = self.engine.stats()
        self._shutdown()

    def _run_commands(self, *, block: bool) -> bool:
        """Run queued commands (waiting for one when idle). False once asked to stop."""
        try:
            item = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self.num_step_errors += 1
            log.exception("engine step failed; aborting %d request(s)", len(self._streams))
            self._fail_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"))
            time.sleep(_ERROR_BACKOFF_S)
            return
        for out in outputs:
            self._deliver(out)
        if self._step_delay_s:
            time.sleep(self._step_delay_s)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # nobody listens (e.g. the abort output of a request already failed)
        stream.put(out)
        if out.finished:
            del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort after a failed step failed request_id=%s", request_id)
            stream.put(error)

    def _shutdown(self) -> None:
        self._fail_all(EngineLoopStopped("engine loop stopped"))
        while True:  # answer commands that raced with stop
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[1].set_exception(EngineLoopStopped("engine loop stopped"))
        log.info("engine loop stopped")
