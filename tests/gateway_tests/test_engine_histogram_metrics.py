"""Workers' engine histograms (queue time, tokens per step) reach /metrics under vLLM's names."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from contract.histogram import ITERATION_TOKENS_BUCKETS, QUEUE_TIME_BUCKETS, Histogram
from gateway.metrics import _WorkerCollector
from gateway.worker_client import _load_snapshot
from protos.pdserve.v1 import common_pb2


def report(role: str, queue_times: list[float], step_tokens: list[int]) -> common_pb2.LoadReport:
    queue, steps = Histogram(QUEUE_TIME_BUCKETS), Histogram(ITERATION_TOKENS_BUCKETS)
    for value in queue_times:
        queue.observe(value)
    for value in step_tokens:
        steps.observe(value)
    q, s = queue.snapshot(), steps.snapshot()
    return common_pb2.LoadReport(
        role=role,
        queue_time_bucket_counts=q.counts,
        queue_time_sum=q.sum,
        iteration_tokens_bucket_counts=s.counts,
        iteration_tokens_sum=s.sum,
    )


def scrape(*reports: tuple[str, common_pb2.LoadReport]) -> dict:
    workers = [
        SimpleNamespace(role=r.role, address=address, healthy=True, load=_load_snapshot(r))
        for address, r in reports
    ]
    pool = SimpleNamespace(workers=workers, index=SimpleNamespace(hashes=lambda a: set()))
    registry = CollectorRegistry()
    registry.register(_WorkerCollector(pool, "tiny"))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str, worker: str) -> dict[str, float]:
    """{le or "": value} of one worker's `_bucket`, `_sum` or `_count` samples."""
    return {
        s.labels.get("le", ""): s.value
        for s in family.samples
        if s.name == family.name + suffix and s.labels["worker"] == worker
    }


def test_histograms_render_cumulative_buckets_sum_and_count_per_worker():
    families = scrape(
        ("p0:1", report("prefill", [0.01, 0.3, 0.31, 100.0, 9000.0], [1, 37, 2048])),
        ("d0:1", report("decode", [1.0], [1, 1, 3])),
    )
    queue = families["pdserve:request_queue_time_seconds"]
    assert queue.type == "histogram"
    buckets = samples(queue, "_bucket", "p0:1")
    assert len(buckets) == len(QUEUE_TIME_BUCKETS) + 1
    # le inclusive: 0.3 is in le="0.3"; 9000 s is above 7680, only in +Inf.
    assert (buckets["0.3"], buckets["0.5"], buckets["120.0"], buckets["7680.0"]) == (2, 3, 4, 4)
    assert buckets["+Inf"] == 5
    assert list(buckets.values()) == sorted(buckets.values())
    assert samples(queue, "_count", "p0:1") == {"": 5}
    assert samples(queue, "_sum", "p0:1") == {"": 0.01 + 0.3 + 0.31 + 100.0 + 9000.0}

    steps = families["pdserve:iteration_tokens_total"]
    assert steps.type == "histogram"
    buckets = samples(steps, "_bucket", "p0:1")
    assert (buckets["1.0"], buckets["32.0"], buckets["64.0"], buckets["2048.0"]) == (1, 1, 2, 3)
    assert buckets["16384.0"] == buckets["+Inf"] == 3
    assert samples(steps, "_count", "p0:1") == {"": 3}
    assert samples(steps, "_sum", "p0:1") == {"": 1 + 37 + 2048}
    decode = samples(steps, "_bucket", "d0:1")
    assert (decode["1.0"], decode["8.0"]) == (2, 3)
    assert samples(steps, "_sum", "d0:1") == {"": 5}

    labels = {(s.labels["model_name"], s.labels["role"], s.labels["worker"]) for s in queue.samples}
    assert labels == {("tiny", "prefill", "p0:1"), ("tiny", "decode", "d0:1")}


def test_a_worker_without_the_histograms_gets_no_series_but_the_families_stay():
    old = common_pb2.LoadReport(role="decode", num_running=1)  # a worker from before them
    load = _load_snapshot(old)
    assert load.queue_time is None and load.iteration_tokens is None
    families = scrape(("d0:1", old))
    assert families["pdserve:request_queue_time_seconds"].samples == []
    assert families["pdserve:iteration_tokens_total"].samples == []
