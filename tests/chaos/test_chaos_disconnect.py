"""Clients that hang up at every stage of a request: afterwards every KV block on both sides
is back in the pool (checked through the workers' GetDebugState)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from chaos_client import LONG_PROMPT, SHORT_PROMPT, completion_body, new_client, request

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]


async def _hang_up_when(up, bodies, url, ready, timeout_s=30.0) -> None:
    """Start every request, wait until `ready(cluster)` (polled), then hang up on all."""
    async with new_client() as client:
        tasks = [asyncio.create_task(request(client, url, b, timeout_s=60)) for b in bodies]
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(ready, up):
            assert time.monotonic() < deadline, "the stage to cut at was never reached"
            assert not all(t.done() for t in tasks), [t.result().describe() for t in tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _record(figures, stage: str, requests: int, freed: dict[str, float]) -> None:
    figures.setdefault("disconnect", {})[stage] = {
        "requests": requests, "blocks_leaked": 0,
        "max_seconds_until_clean": round(max(freed.values()), 3),
    }  # fmt: skip


def test_hang_up_while_the_prompt_is_transferred(up, figures):
    """p0 delays each KV chunk by 100 ms: hang up while it holds leases being pulled."""
    url = f"{up.gateways['main'].url}/v1/completions"
    bodies = [completion_body(f"{LONG_PROMPT} {i}", 32, stream=i % 2 == 0) for i in range(6)]
    asyncio.run(_hang_up_when(up, bodies, url, lambda c: c.debug_state("p0").num_held_leases))
    _record(figures, "mid_transfer", len(bodies), up.wait_all_free(timeout_s=10))


@pytest.mark.parametrize("delay_ms", [0, 5, 20, 60, 120, 250])
def test_hang_up_after_a_delay(up, figures, delay_ms):
    """A sweep of hang-up times over admission, prefill, transfer and the first tokens."""
    url = f"{up.gateways['main'].url}/v1/completions"
    bodies = [completion_body(f"{LONG_PROMPT} {i}", 64, stream=i % 2 == 0) for i in range(4)]
    bodies.append(completion_body(SHORT_PROMPT, 64, stream=True))  # prefilled on decode
    bodies.append(completion_body(LONG_PROMPT, 16, stream=True, n=2))

    async def scenario():
        async with new_client() as client:
            tasks = [asyncio.create_task(request(client, url, b, timeout_s=60)) for b in bodies]
            await asyncio.sleep(delay_ms / 1000)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    _record(figures, f"after_{delay_ms}ms", len(bodies), up.wait_all_free(timeout_s=10))


def test_hang_up_mid_decode(up, figures):
    url = f"{up.gateways['main'].url}/v1/completions"
    bodies = [completion_body(f"{LONG_PROMPT} {i}", 300, stream=True, ignore_eos=True)
              for i in range(6)]  # fmt: skip
    bodies.append(completion_body(SHORT_PROMPT, 300, stream=True, ignore_eos=True, n=2))

    async def scenario():
        async with new_client() as client:
            return await asyncio.gather(*(
                request(client, url, b, timeout_s=60, disconnect_after_chunks=3) for b in bodies
            ))  # fmt: skip

    outcomes = asyncio.run(scenario())
    assert all(o.disconnected and o.num_chunks >= 3 for o in outcomes), [
        o.describe() for o in outcomes
    ]
    _record(figures, "mid_decode", len(bodies), up.wait_all_free(timeout_s=10))


def test_hang_up_while_queued_on_the_decode_workers(up, figures):
    """More generation than the decode pools hold (20 x 480 tokens vs 2 x 2048 slots): requests
    wait or get preempted on the decode workers; hang up on all of them then."""
    url = f"{up.gateways['main'].url}/v1/completions"
    bodies = [completion_body(f"{SHORT_PROMPT} {i}", 480, stream=True, ignore_eos=True)
              for i in range(20)]  # fmt: skip

    def queued(c) -> bool:
        return any(c.debug_state(d).num_waiting > 0 for d in ("d0", "d1"))

    asyncio.run(_hang_up_when(up, bodies, url, queued))
    _record(figures, "queued_on_decode", len(bodies), up.wait_all_free(timeout_s=10))


def test_hang_up_storm(up, figures):
    """Many requests cut at staggered times in 0-80 ms, in waves: every cut lands somewhere
    between admission and the first tokens, including inside the engine commands that add a
    request or reserve its blocks."""
    url = f"{up.gateways['main'].url}/v1/completions"
    rng = random.Random(7)
    cut = 0

    async def wave():
        nonlocal cut
        async with new_client() as client:
            tasks = []
            for i in range(30):
                prompt = f"{LONG_PROMPT} {i}" if i % 2 else f"{SHORT_PROMPT} {i}"
                body = completion_body(prompt, 200, stream=i % 3 != 0, ignore_eos=True)
                tasks.append(asyncio.create_task(request(client, url, body, timeout_s=60)))
            for task in tasks:
                await asyncio.sleep(rng.uniform(0, 0.006))
                task.cancel()
                cut += 1
            await asyncio.gather(*tasks, return_exceptions=True)

    took = {}
    for _ in range(3):
        asyncio.run(wave())
        took = up.wait_all_free(timeout_s=10)
    _record(figures, "storm", cut, took)
