"""EngineLoop with a scripted engine (no model): delivery, commands, failures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from engine.engine_loop import EngineLoop, EngineLoopStopped, EngineStepError, RequestStream
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


@dataclass
class Req:
    remaining: int
    produced: int = 0


class ScriptedEngine:
    """Each request emits one token per step until `max_tokens`; step N may be set to raise."""

    def __init__(self) -> None:
        self.requests: dict[str, Req] = {}
        self.pending: list[RequestOutput] = []
        self.fail_on_step: int | None = None
        self.steps = 0
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params, *, prefill_only=False):
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.requests[request_id] = Req(params.max_tokens)

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            self.pending.append(RequestOutput(request_id, [], None, True, "abort", 1))

    def has_unfinished_requests(self):
        return bool(self.requests or self.pending)

    def step(self):
        time.sleep(0.001)  # a step takes time, as a real one does
        self.steps += 1
        if self.fail_on_step == self.steps:
            raise RuntimeError("kernel exploded")
        outputs, self.pending = self.pending, []
        for rid, req in list(self.requests.items()):
            req.produced += 1
            done = req.produced == req.remaining
            outputs.append(
                RequestOutput(rid, [req.produced], None, done, "length" if done else None, 1)
            )
            if done:
                del self.requests[rid]
        return outputs

    def stats(self):
        return {"running": len(self.requests)}


async def collect(stream: RequestStream) -> list[RequestOutput]:
    return [out async for out in stream]


def params(n):
    return SamplingParams(max_tokens=n)


def test_outputs_reach_each_requests_stream():
    async def main():
        loop = EngineLoop(ScriptedEngine())
        loop.start()
        try:
            streams = {rid: RequestStream(asyncio.get_running_loop()) for rid in ("a", "b")}
            await asyncio.wrap_future(loop.add_request("a", [1], params(3), streams["a"]))
            await asyncio.wrap_future(loop.add_request("b", [1], params(5), streams["b"]))
            a, b = await asyncio.gather(collect(streams["a"]), collect(streams["b"]))
            assert [o.new_token_ids[0] for o in a] == [1, 2, 3] and a[-1].finished
            assert [o.new_token_ids[0] for o in b] == [1, 2, 3, 4, 5]
        finally:
            loop.stop()

    asyncio.run(main())


def test_engine_errors_in_commands_reach_the_caller():
    async def main():
        loop = EngineLoop(ScriptedEngine())
        loop.start()
        try:
            stream = RequestStream(asyncio.get_running_loop())
            await asyncio.wrap_future(loop.add_request("a", [1], params(10**6), stream))
            with pytest.raises(ValueError, match="already in use"):
                await asyncio.wrap_future(loop.add_request("a", [1], params(5), stream))
            await asyncio.wrap_future(loop.abort("a"))
            outs = await collect(stream)
            assert outs[-1].finish_reason == "abort"
        finally:
            loop.stop()

    asyncio.run(main())


def test_failed_step_fails_requests_and_the_thread_survives():
    async def main():
        engine = ScriptedEngine()
        engine.fail_on_step = 2
        loop = EngineLoop(engine)
        loop.start()
        try:
            stream = RequestStream(asyncio.get_running_loop())
            await asyncio.wrap_future(loop.add_request("a", [1], params(10), stream))
            first = await stream.get()
            assert first.new_token_ids == [1]
            with pytest.raises(EngineStepError, match="kernel exploded"):
                await stream.get()
            assert engine.aborted == ["a"]  # its blocks were given back
            assert loop.alive and loop.num_step_errors == 1
            later = RequestStream(asyncio.get_running_loop())
            await asyncio.wrap_future(loop.add_request("b", [1], params(2), later))
            assert [o.new_token_ids for o in await collect(later)] == [[1], [2]]
        finally:
            loop.stop()

    asyncio.run(main())


def test_stop_fails_open_streams_and_later_commands():
    async def main():
        loop = EngineLoop(ScriptedEngine())
        loop.start()
        stream = RequestStream(asyncio.get_running_loop())
        await asyncio.wrap_future(loop.add_request("a", [1], params(10**6), stream))
        await asyncio.to_thread(loop.stop)
        assert not loop.alive
        with pytest.raises(EngineLoopStopped):
            while True:
                await stream.get()
        with pytest.raises(EngineLoopStopped):
            await asyncio.wrap_future(loop.stats())

    asyncio.run(main())


def test_call_runs_on_the_engine_thread():
    import threading

    async def main():
        loop = EngineLoop(ScriptedEngine(), name="engine-under-test")
        loop.start()
        try:
            name = await asyncio.wrap_future(loop.call(lambda e: threading.current_thread().name))
            assert name == "engine-under-test"
        finally:
            loop.stop()

    asyncio.run(main())


def test_a_step_delay_spaces_the_steps_and_a_negative_one_is_refused():
    with pytest.raises(ValueError, match="step_delay_s"):
        EngineLoop(ScriptedEngine(), step_delay_s=-1)

    async def main():
        loop = EngineLoop(ScriptedEngine(), step_delay_s=0.02)
        loop.start()
        try:
            stream = RequestStream(asyncio.get_running_loop())
            start = time.monotonic()
            await asyncio.wrap_future(loop.add_request("a", [1], params(5), stream))
            outs = await collect(stream)
            # Five steps, each followed by the delay (the last one's may still be running).
            assert len(outs) == 5 and time.monotonic() - start >= 4 * 0.02
        finally:
            loop.stop()

    asyncio.run(main())
