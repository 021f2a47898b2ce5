"""Workers SIGKILLed under concurrent streaming load through the `main` gateway (p0 + d0, d1)."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from chaos_client import LONG_PROMPT, completion_body, new_client, request, summary
from chaos_cluster import gateway_health, metrics, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

NUM_STREAMS = 8
LONG_GENERATION = 440  # tokens per stream: >= 1.3 s of decoding (3 ms a step), ~40 in the prompt
PROMPT_OF = [f"{LONG_PROMPT} number {i}" for i in range(NUM_STREAMS)]


def _stream_body(i: int) -> dict:
    return completion_body(PROMPT_OF[i], LONG_GENERATION, stream=True, ignore_eos=True)


def _openai_stream(base_url: str) -> str:
    """The official client on a stream that loses its decode worker: it must raise, not hang."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=30,
                           max_retries=0)  # fmt: skip
    stream = client.completions.create(model="tiny", prompt=LONG_PROMPT, stream=True,
                                       max_tokens=LONG_GENERATION, temperature=0.0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                return "finished"
    except openai.APIError as exc:
        return f"APIError: {exc.message}"
    return "ended without a finish reason"


def test_decode_worker_killed_mid_stream(up, figures):
    """Every stream ends within a bound: those on d0 with a clean error, the others finished;
    p0 and d1 end with every block free; a restarted d0 is taken back."""
    gateway = up.gateways["main"]
    url = f"{gateway.url}/v1/completions"

    async def scenario():
        sdk = asyncio.create_task(asyncio.to_thread(_openai_stream, gateway.url))
        async with new_client() as client:
            tasks = [asyncio.create_task(request(client, url, _stream_body(i), timeout_s=90))
                     for i in range(NUM_STREAMS)]  # fmt: skip
            # Decoding outruns the SSE relay: kill d0 while it is itself mid-decode.
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(up.debug_state, "d0")).num_running == 0:
                assert time.monotonic() < deadline, "d0 never ran a stream"
            killed_at = time.monotonic()
            up.workers["d0"].kill()
            outcomes = await asyncio.gather(*tasks)
            return killed_at, outcomes, await asyncio.wait_for(sdk, 60)

    killed_at, outcomes, sdk_result = asyncio.run(scenario())
    counts = summary(outcomes)
    details = "\n".join(o.describe() for o in outcomes)
    assert counts["broken"] == 0, details
    assert counts["error"] >= 1, f"no stream was on the killed worker?\n{details}"
    assert counts["ok"] >= 1, f"streams on the surviving worker must finish\n{details}"
    for out in outcomes:
        if out.kind == "error":
            # An error chunk then [DONE] once the stream had started, else a 503 status.
            assert out.status in (200, 503) and (out.done or out.status == 503), out.describe()
            assert out.error["type"] == "service_unavailable", out.describe()
            assert out.ended_at - killed_at < 10.0, f"error came late: {out.describe()}"
        else:
            assert out.finish_reasons == ["length"] and out.text
    assert sdk_result == "finished" or sdk_result.startswith("APIError"), sdk_result

    freed = up.wait_all_free("p0", "d1", timeout_s=15)
    up.start(up.workers["d0"])
    up.wait_gateways_healthy()
    up.wait_all_free("d0")
    figures["decode_kill"] = {
        "streams": NUM_STREAMS + 1, **counts,
        "max_error_latency_s": round(max(o.ended_at - killed_at for o in outcomes
                                         if o.kind == "error"), 3),
        "seconds_until_survivors_clean": {k: round(v, 3) for k, v in freed.items()},
        "blocks_leaked": 0,
    }  # fmt: skip


def _disaggregated(gateway) -> dict[str, float]:
    m = metrics(gateway)
    return {where: m.get(f'pdserve:disaggregated_requests_total{{model_name="tiny",prefill="{where}"}}', 0.0)
            for where in ("local", "remote")}  # fmt: skip


async def _complete_all(url: str, bodies: list[dict]) -> list:
    async with new_client() as client:
        return await asyncio.gather(*(request(client, url, b, timeout_s=60) for b in bodies))


def test_prefill_worker_killed_mid_transfer_then_restarted(up, figures):
    """In-flight requests are retried with local prefill (none has a token yet); new ones are
    prefilled on the decode workers; the restarted worker (same port, new epoch) is used again."""
    gateway, p0 = up.gateways["main"], up.workers["p0"]
    url = f"{gateway.url}/v1/completions"
    bodies = [completion_body(PROMPT_OF[i], 24, stream=i % 2 == 0) for i in range(6)]
    reference = asyncio.run(_complete_all(url, bodies))
    assert all(o.kind == "ok" for o in reference), [o.describe() for o in reference]
    up.wait_all_free()
    epoch_before = up.load("p0").epoch

    async def scenario():
        async with new_client() as client:
            tasks = [asyncio.create_task(request(client, url, b, timeout_s=60)) for b in bodies]
            # p0 delays every KV chunk by 100 ms: kill it once it holds a lease being pulled.
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(up.debug_state, "p0")).num_held_leases == 0:
                assert time.monotonic() < deadline, "no prefill reached the transfer stage"
            p0.kill()
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(scenario())
    details = "\n".join(o.describe() for o in outcomes)
    # None had a token yet, so each is retried with local prefill: same greedy text as before.
    assert [(o.kind, o.text) for o in outcomes] == [("ok", r.text) for r in reference], details
    in_flight = summary(outcomes)

    # p0 is down: new requests are prefilled on the decode workers.
    before = _disaggregated(gateway)
    wait_for(lambda: (gateway_health(gateway) or {}).get("status") == "degraded", 10,
             "/health to report the prefill worker down")  # fmt: skip
    fallback = asyncio.run(_complete_all(url, bodies))
    assert [(o.kind, o.text) for o in fallback] == [("ok", r.text) for r in reference], "\n".join(
        o.describe() for o in fallback
    )
    after = _disaggregated(gateway)
    assert after["local"] - before["local"] == len(bodies) and after["remote"] == before["remote"]
    up.wait_all_free("d0", "d1")

    # Restarted on the same port: a new instance (epoch), taken back without touching the rest.
    up.start(p0)
    assert up.load("p0").epoch != epoch_before
    took = wait_for(lambda: up.gateway_sees_all(gateway), 15, "the gateway to take p0 back")
    again = asyncio.run(_complete_all(url, bodies))
    assert [(o.kind, o.text) for o in again] == [("ok", r.text) for r in reference], "\n".join(
        o.describe() for o in again
    )
    final = _disaggregated(gateway)
    assert final["remote"] - after["remote"] == len(bodies), "requests did not go through p0"
    up.wait_all_free()
    figures["prefill_kill"] = {
        "in_flight": len(outcomes), **in_flight, "fallback_ok": len(fallback),
        "seconds_to_take_back_restarted_worker": round(took, 3), "blocks_leaked": 0,
    }  # fmt: skip
