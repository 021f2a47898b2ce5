"""Flooding the `small` gateway (--max-pending 4, p0 + d1) past its admission bound."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from chaos_client import LONG_PROMPT, SHORT_PROMPT, completion_body, new_client, request, summary
from chaos_cluster import SMALL_MAX_PENDING, metrics

from pdserve.client import AsyncGatewayClient, GatewayCallError, GenerationOptions

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

HOLD_TOKENS = 440  # the streams that fill every slot last a second or two


def _flood_bodies(count: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(count):
        if i % 3 == 2:
            body = {"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 8,
                    "temperature": 0.0, "stream": i % 2 == 0}  # fmt: skip
            out.append(("/v1/chat/completions", body))
        else:
            prompt = LONG_PROMPT if i % 2 else SHORT_PROMPT
            out.append(("/v1/completions", completion_body(prompt, 8, stream=i % 2 == 0)))
    return out


async def _probe_health_and_metrics(client: httpx.AsyncClient, base: str) -> list[float]:
    """Seconds each /health and /metrics call took. Both must answer: /metrics 200, /health
    200 -- or 503 if a load poll of the stalled worker already timed out, as it should."""
    took = []
    for path in ("/health", "/metrics"):
        start = time.monotonic()
        resp = await client.get(f"{base}{path}", timeout=5)
        took.append(time.monotonic() - start)
        assert resp.status_code in ((200, 503) if path == "/health" else (200,)), (
            path, resp.status_code, resp.text[:300])  # fmt: skip
    return took


async def _grpc_generate(address: str) -> str:
    client = AsyncGatewayClient(address, timeout=10)
    try:
        await client.generate(LONG_PROMPT, GenerationOptions(max_tokens=4, temperature=0.0))
        return "OK"
    except GatewayCallError as exc:
        return exc.code.name
    finally:
        await client.close()


def test_flood_past_max_pending_gets_429_and_recovers(up, figures):
    gateway = up.gateways["small"]
    base = gateway.url

    async def scenario():
        async with new_client() as client:
            events = [asyncio.Event() for _ in range(SMALL_MAX_PENDING)]
            hold = [asyncio.create_task(request(
                client, f"{base}/v1/completions",
                completion_body(f"{LONG_PROMPT} {i}", HOLD_TOKENS, stream=True, ignore_eos=True),
                timeout_s=90, first_chunk=events[i])) for i in range(SMALL_MAX_PENDING)]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            # d1 stalls, so the four streams hold every slot for as long as the flood lasts:
            # the flood, over HTTP and gRPC, is turned away at the door.
            with up.workers["d1"].frozen():
                flood = await asyncio.gather(*(request(client, f"{base}{path}", body,
                                                       timeout_s=30)
                                               for path, body in _flood_bodies(40)))  # fmt: skip
                grpc_code = await _grpc_generate(gateway.grpc_address)
                probes = await _probe_health_and_metrics(client, base)
                still_holding = sum(not t.done() for t in hold)
            held = await asyncio.gather(*hold)
            after = await asyncio.gather(*(request(client, f"{base}{path}", body, timeout_s=60)
                                           for path, body in _flood_bodies(4)))  # fmt: skip
            return flood, grpc_code, probes, still_holding, held, after

    flood, grpc_code, probes, still_holding, held, after = asyncio.run(scenario())
    assert still_holding == SMALL_MAX_PENDING, "a holding stream ended: the test is void"
    details = "\n".join(o.describe() for o in flood)
    assert all(o.status == 429 for o in flood), details
    for out in flood:
        assert out.headers.get("retry-after", "").isdigit(), out.headers
        assert out.error["type"] == "rate_limit_error" and out.error["code"] == 429
    assert grpc_code == "RESOURCE_EXHAUSTED"
    assert max(probes) < 2.0, f"/health or /metrics slow under load: {probes}"
    assert [o.kind for o in held] == ["ok"] * SMALL_MAX_PENDING
    assert [o.kind for o in after] == ["ok"] * len(after), [o.describe() for o in after]
    up.wait_all_free("p0", "d1")
    figures["overload"] = {"flood_requests": len(flood) + 1, "rejected_429": len(flood),
                           "grpc": grpc_code, "status_5xx": 0,
                           "health_metrics_max_s": round(max(probes), 3),
                           "recovered_ok": len(after)}  # fmt: skip


def test_unbounded_burst_never_5xx(up, figures):
    """A burst of 60 with no ordering: each request is served or gets 429, none is lost."""
    base = up.gateways["small"].url

    async def scenario():
        async with new_client() as client:
            return await asyncio.gather(*(request(client, f"{base}{path}", body, timeout_s=60)
                                          for path, body in _flood_bodies(60)))  # fmt: skip

    outcomes = asyncio.run(scenario())
    counts = summary(outcomes)
    assert counts["broken"] == 0, [o.describe() for o in outcomes if o.kind == "broken"]
    assert all(o.status in (200, 429) for o in outcomes), sorted({o.status for o in outcomes})
    assert counts["ok"] >= SMALL_MAX_PENDING
    up.wait_all_free("p0", "d1")
    figures["burst"] = {"requests": len(outcomes), **counts,
                        "rejected_429": sum(o.status == 429 for o in outcomes)}  # fmt: skip


def _preemptions(gateway) -> float:
    return sum(v for k, v in metrics(gateway).items()
               if k.startswith("pdserve:num_preemptions_total{") and 'role="decode"' in k)  # fmt: skip


def test_more_generation_than_kv_preempts_and_still_finishes(up, figures):
    """20 streams of 480 tokens want ~4x the decode workers' KV: preemption by recompute keeps
    every one of them going to the end (no deadlock), and the metrics show the preemptions."""
    gateway = up.gateways["main"]
    url = f"{gateway.url}/v1/completions"
    bodies = [completion_body(f"{SHORT_PROMPT} {i}", 480, stream=i % 2 == 0, ignore_eos=True)
              for i in range(20)]  # fmt: skip
    before = _preemptions(gateway)
    start = time.monotonic()

    async def scenario():
        async with new_client() as client:
            return await asyncio.gather(*(request(client, url, b, timeout_s=150) for b in bodies))

    outcomes = asyncio.run(scenario())
    took = time.monotonic() - start
    assert [o.kind for o in outcomes] == ["ok"] * len(bodies), [o.describe() for o in outcomes]
    assert all(o.finish_reasons == ["length"] for o in outcomes)
    up.wait_all_free("d0", "d1")
    preempted = wait_for_value(lambda: _preemptions(gateway) - before, 5)
    assert preempted > 0, "no preemption: the test did not overcommit the KV pools"
    figures["preemption"] = {"requests": len(bodies), "tokens_each": 480, "ok": len(outcomes),
                             "preemptions": preempted, "seconds": round(took, 2)}  # fmt: skip


def wait_for_value(read, timeout_s: float) -> float:
    """`read()` once it is positive (metrics lag by one load poll), else its last value."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value <= 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value
