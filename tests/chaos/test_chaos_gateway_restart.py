"""The gateway dies while the workers stay up: the workers drop its orphaned requests within a
bound (streams at once, unpulled prompts when their lease runs out), and a new gateway on the
same port serves again."""

from __future__ import annotations

import asyncio
import time

import pytest
from chaos_client import LONG_PROMPT, completion_body, new_client, request
from chaos_cluster import P0_LEASE_MS
from cluster_token import worker_channel

from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

ORPHAN_BOUND_S = P0_LEASE_MS / 1000 + 3.0  # lease + reaper + margin for a busy machine


def test_gateway_killed_under_load(up, figures):
    gateway = up.gateways["main"]
    url = f"{gateway.url}/v1/completions"
    bodies = [completion_body(f"{LONG_PROMPT} {i}", 440, stream=True, ignore_eos=True)
              for i in range(8)]  # fmt: skip

    def busy(c) -> bool:
        return any(c.debug_state(d).num_running > 0 for d in ("d0", "d1"))

    async def scenario():
        async with new_client() as client:
            tasks = [asyncio.create_task(request(client, url, b, timeout_s=30)) for b in bodies]
            deadline = time.monotonic() + 30
            while not await asyncio.to_thread(busy, up):
                assert time.monotonic() < deadline, "the decode workers never got busy"
            gateway.kill()
            killed_at = time.monotonic()
            return killed_at, await asyncio.gather(*tasks)

    killed_at, outcomes = asyncio.run(scenario())
    # The clients lose their connection (the gateway is gone), promptly and without a hang.
    assert all(o.kind != "broken" or "hang" not in (o.exception or "") for o in outcomes)
    assert all(o.ended_at - killed_at < 5 for o in outcomes), [o.describe() for o in outcomes]
    freed = up.wait_all_free(timeout_s=ORPHAN_BOUND_S)

    up.start(gateway)
    restarted = asyncio.run(_one(url))
    assert restarted.kind == "ok", restarted.describe()
    up.wait_all_free()
    figures["gateway_kill"] = {
        "streams": len(bodies), "blocks_leaked": 0,
        "max_seconds_until_workers_clean": round(max(freed.values()), 3),
    }  # fmt: skip


async def _one(url: str):
    async with new_client() as client:
        return await request(client, url, completion_body(LONG_PROMPT, 8), timeout_s=30)


def test_prompt_prefilled_for_a_gateway_that_died_is_freed_by_its_lease(up, figures):
    """What a gateway leaves behind when it dies between Prefill and Decode: a lease nobody
    will pull. p0 frees it when the lease runs out."""
    p0 = up.workers["p0"]
    prompt = list(range(20, 60))
    with worker_channel(p0.address) as channel:
        reply = worker_pb2_grpc.PrefillServiceStub(channel).Prefill(
            worker_pb2.PrefillRequest(transfer_id="orphan-1", prompt_token_ids=prompt,
                                      sampling=common_pb2.SamplingParams(max_tokens=4)),
            timeout=30,
        )  # fmt: skip
    assert len(reply.handle.block_ids) == 3
    held = up.debug_state("p0")
    assert held.num_held_leases == 1 and held.num_free_blocks < held.num_blocks
    freed = up.wait_all_free("p0", timeout_s=ORPHAN_BOUND_S)
    assert freed["p0"] >= P0_LEASE_MS / 1000 - 1.0, "freed long before the lease ran out?"
    figures["orphan_lease"] = {"lease_s": P0_LEASE_MS / 1000,
                               "seconds_until_freed": round(freed["p0"], 3)}  # fmt: skip
