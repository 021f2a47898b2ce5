"""Sends the benchmark's requests on their arrival schedule, bounded by --max-concurrency."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

from pdserve.bench.arrivals import arrival_offsets
from pdserve.bench.client import RequestInput, RequestOutput, send_request

# A whole benchmark may legitimately stream for a long time; per-request limits are the server's.
SESSION_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)


@dataclass(slots=True, frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # requests per second; inf sends everything at t=0
    burstiness: float = 1.0  # gamma shape of the gaps; 1.0 is Poisson
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    seed: int = 0
    disable_tqdm: bool = False
    # False: a new connection per request. Some servers (llama.cpp's) close idle keep-alive
    # connections, and a request sent on one the server just closed fails.
    keep_alive: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


@dataclass(slots=True, frozen=True)
class BenchRun:
    outputs: list[RequestOutput]
    start: float  # time.perf_counter() at the start of the run
    duration: float  # seconds from the start to the last response


def _session(max_concurrency: int | None, keep_alive: bool = True) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=not keep_alive)
    return aiohttp.ClientSession(connector=connector, timeout=SESSION_TIMEOUT)


async def _run_load(inputs: list[RequestInput], load: LoadConfig) -> BenchRun:
    offsets = arrival_offsets(len(inputs), load.request_rate, load.burstiness, load.seed)
    slots = asyncio.Semaphore(load.max_concurrency or len(inputs) or 1)
    progress = tqdm(total=len(inputs), disable=load.disable_tqdm, desc="requests")
    async with _session(load.max_concurrency, load.keep_alive) as session:
        start = time.perf_counter()

        async def one(req: RequestInput, offset: float) -> RequestOutput:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with slots:
                out = await send_request(session, req)
            progress.update(1)
            return out

        outputs = await asyncio.gather(*(one(r, o) for r, o in zip(inputs, offsets, strict=True)))
        duration = time.perf_counter() - start
    progress.close()
    return BenchRun(list(outputs), start, duration)


def run_load(inputs: list[RequestInput], load: LoadConfig) -> BenchRun:
    """Sends every input at its arrival time (see `arrival_offsets`) and waits for all."""
    return asyncio.run(_run_load(inputs, load))


async def _probe(req: RequestInput) -> RequestOutput:
    async with _session(1) as session:
        return await send_request(session, req)


def probe(req: RequestInput) -> RequestOutput:
    """One request before the run: checks the endpoint, model and key work."""
    return asyncio.run(_probe(req))
