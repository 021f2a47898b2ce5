"""A worker in both roles on one engine (vLLM's `kv_both`).

The prefill and decode roles share one engine loop and one identity: a prefill here leaves its
blocks held under a lease exactly as on a prefill-only worker (any decode worker may pull them),
and a decode here of a handle this worker issued copies the blocks within the pool instead of
pulling them over a socket (`KVImporter`'s local path, same lease checks).
"""

from __future__ import annotations

import asyncio

from engine.engine import LLMEngine
from engine.engine_loop import EngineLoop
from worker.config import BothWorkerConfig
from worker.decode import DecodeWorker
from worker.identity import new_identity
from worker.prefill import PrefillWorker


class BothWorker:
    role = "both"

    def __init__(self, engine: LLMEngine, config: BothWorkerConfig) -> None:
        self.config = config
        self.engine_loop = EngineLoop(engine, name="worker-engine")
        self.identity = new_identity(self.role, config.engine_id)
        self.prefill = PrefillWorker(
            engine, config.prefill, engine_loop=self.engine_loop, identity=self.identity
        )
        self.decode = DecodeWorker(
            engine,
            config.decode,
            engine_loop=self.engine_loop,
            identity=self.identity,
            local_exporter=self.prefill.exporter,
        )

    @property
    def serving(self) -> bool:
        return self.prefill.serving and self.decode.serving

    @property
    def kv_endpoint(self) -> str:
        return self.prefill.kv_endpoint

    def start(self, bound_host: str, bound_port: int) -> None:
        self.engine_loop.start()
        self.prefill.start(bound_host, bound_port)
        self.decode.start()

    async def drain(self, timeout_s: float) -> None:
        await asyncio.gather(self.prefill.drain(timeout_s), self.decode.drain(timeout_s))

    async def close(self) -> None:
        await self.decode.close()
        await self.prefill.close()  # frees the leases while the loop still runs
        self.engine_loop.stop()
