"""KV-aware routing across real workers: two prefill workers and a decode worker running the
tiny random Llama, a gateway with `--router kv-aware`, all as processes on 127.0.0.1.

The prefill workers publish KV events with pdserve-block-hash-v1; the gateway's index must match
each worker's own snapshot, prompts sharing a prefix must go where it is cached, and a prefill
worker that dies must be dropped from the index while its traffic moves to the other one.
"""

from __future__ import annotations

import time

import httpx
import pytest
from cluster_token import worker_channel
from test_gateway_integration import GatewayProcess, wait_healthy
from test_workers_integration import Worker

from contract.block_hash import hash_blocks
from pdserve.client import GatewayClient, GenerationOptions
from protos.pdserve.v1 import common_pb2, worker_pb2_grpc

BLOCK = 16
PREFIX_A = [(7 * i + 3) % 250 + 5 for i in range(5 * BLOCK)]  # 5 full blocks
PREFIX_B = [(11 * i + 1) % 250 + 5 for i in range(5 * BLOCK)]
OPTIONS = GenerationOptions(max_tokens=4, temperature=0.0)
# Routing does not depend on how a forward is computed: the eager path starts without waiting
# for the compiled CPU kernels.
EAGER = "--enforce-eager"


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    logs = tmp_path_factory.mktemp("kv-routing-logs")
    prefill = [
        Worker("prefill", tiny_llama, logs / f"p{i}.log", "--engine-id", f"prefill-{i}", EAGER)
        for i in range(2)
    ]
    decode = Worker("decode", tiny_llama, logs / "d.log", EAGER)
    gateway = None
    try:
        addresses = [w.wait_listening() for w in prefill]
        decode.wait_listening()
        gateway = GatewayProcess(
            tiny_llama, ",".join(addresses), decode.address, logs / "g.log", "--router", "kv-aware"
        )
        gateway.wait_listening()
        wait_healthy(gateway.http)
        client = GatewayClient(gateway.grpc, timeout=60)
        yield prefill, gateway, client
        client.close()
    finally:
        if gateway is not None:
            gateway.terminate()
        for w in (*prefill, decode):
            w.terminate()


def stub(worker: Worker):
    return worker_pb2_grpc.PrefillServiceStub(worker_channel(worker.address))


def load(worker: Worker) -> common_pb2.LoadReport:
    return stub(worker).GetLoad(common_pb2.GetLoadRequest(), timeout=5)


def worker_snapshot(worker: Worker) -> set[int]:
    reply = stub(worker).GetKVEvents(common_pb2.GetKVEventsRequest(), timeout=5)
    assert reply.is_snapshot and reply.block_size == BLOCK
    return set(reply.snapshot_hashes)


def gateway_index(gateway: GatewayProcess) -> dict[str, dict]:
    health = httpx.get(f"{gateway.http}/health").json()
    return {w["address"]: w for w in health["prefill"]}


def wait_index_matches(prefill, gateway, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        index = gateway_index(gateway)
        want = {w.address: len(worker_snapshot(w)) for w in prefill if w.proc.poll() is None}
        got = {a: index[a]["indexed_blocks"] for a in want}
        if got == want or time.monotonic() > deadline:
            assert got == want
            return
        time.sleep(0.1)


def test_prefixes_are_routed_to_the_worker_that_caches_them(cluster):
    prefill, gateway, client = cluster
    assert client.generate(PREFIX_A + [1, 2, 3], OPTIONS).choices[0].finish_reason == "length"
    wait_index_matches(prefill, gateway)
    holder = next(w for w in prefill if set(hash_blocks(PREFIX_A, BLOCK)) <= worker_snapshot(w))
    other = next(w for w in prefill if w is not holder)
    before = {w.address: load(w) for w in prefill}
    for question in range(4):
        client.generate(PREFIX_A + [20 + question, 9], OPTIONS)
    hits = load(holder).prefix_cache_hits - before[holder.address].prefix_cache_hits
    assert hits == 4 * len(PREFIX_A)  # every later prompt reused the whole cached prefix
    assert load(other).prefix_cache_queries == before[other.address].prefix_cache_queries
    # A new prefix arriving while the holder is idle may go anywhere; after it, both are known.
    client.generate(PREFIX_B + [4], OPTIONS)
    wait_index_matches(prefill, gateway)


def test_the_index_is_each_workers_snapshot_and_idle_workers_report_no_queue(cluster):
    prefill, gateway, client = cluster
    wait_index_matches(prefill, gateway)
    time.sleep(0.5)  # a few load polls after the last request
    health = httpx.get(f"{gateway.http}/health").json()
    assert [w["queue_depth"] for w in health["prefill"] + health["decode"]] == [0, 0, 0]
    metrics = httpx.get(f"{gateway.http}/metrics").text
    assert "pdserve:prefix_cache_hits_total" in metrics
    assert "pdserve:prefix_index_blocks" in metrics


def test_a_prefill_worker_that_leaves_is_dropped_and_its_prefix_rerouted(cluster):
    prefill, gateway, client = cluster
    holder = next(w for w in prefill if set(hash_blocks(PREFIX_A, BLOCK)) <= worker_snapshot(w))
    survivor = next(w for w in prefill if w is not holder)
    queries = load(survivor).prefix_cache_queries
    holder.proc.kill()
    holder.proc.wait()
    result = client.generate(PREFIX_A + [30, 31], OPTIONS)
    assert result.choices[0].finish_reason == "length" and len(result.choices[0].token_ids) == 4
    assert load(survivor).prefix_cache_queries == queries + len(PREFIX_A) + 2
    state = gateway_index(gateway)[holder.address]
    assert not state["healthy"] and state["indexed_blocks"] == 0
