"""Prometheus metrics: measured at the gateway, plus the workers' load reports at scrape time.

Names follow vLLM's under the `pdserve:` prefix (see docs/internals.md). Each gateway has its
own registry, so tests can run several side by side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from contract.histogram import HistogramSnapshot
from gateway.worker_pool import WorkerPool

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)


_TPOT_BUCKETS = (  # vLLM's request_time_per_output_token_seconds buckets
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
MODEL_LABEL = "model_name"  # on every series, as vLLM


class _Bound:
    """A labelled metric with `model_name` already filled in: `.labels(...)` takes the rest."""

    def __init__(self, metric, model_name: str) -> None:
        self._metric = metric
        self._model = model_name

    def labels(self, *values: str):
        return self._metric.labels(self._model, *values)


class GatewayMetrics:
    def __init__(self, pool: WorkerPool, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        m = [MODEL_LABEL]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        def counter(name: str, doc: str, *labels: str):
            metric = Counter(name, doc, [*m, *labels], registry=r)
            return _Bound(metric, model_name) if labels else metric.labels(model_name)

        self.ttft = histogram(
            "pdserve:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "pdserve:inter_token_latency_seconds", "Time between tokens.", _LATENCY_BUCKETS
        )
        self.e2e = histogram("pdserve:e2e_request_latency_seconds", "Request latency.", _E2E_BUCKETS)
        # Per choice, measured at the gateway (vLLM measures these in its engine, where the
        # prefill time starts when the request is scheduled; here it starts when the choice is
        # dispatched to a worker, so it includes the worker's queue).
        self.prefill_time = histogram(
            "pdserve:request_prefill_time_seconds",
            "Choice dispatched to a worker until its first token.",
            _E2E_BUCKETS,
        )
        self.decode_time = histogram(
            "pdserve:request_decode_time_seconds",
            "First token of a choice until its last.",
            _E2E_BUCKETS,
        )
        self.tpot = histogram(
            "pdserve:request_time_per_output_token_seconds",
            "Decode time of a choice over its output tokens after the first.",
            _TPOT_BUCKETS,
        )
        self.prompt_tokens = counter("pdserve:prompt_tokens", "Prompt tokens.")
        self.generation_tokens = counter("pdserve:generation_tokens", "Generated tokens.")
        self.success = counter(
            "pdserve:request_success", "Finished choices by reason.", "finished_reason"
        )
        self.failure = counter("pdserve:request_failure", "Requests that failed, by error type.",
                               "error")  # fmt: skip
        self.disaggregated = counter(
            "pdserve:disaggregated_requests", "Choices by where the prompt was prefilled.", "prefill"
        )
        r.register(_WorkerCollector(pool, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector(Collector):
    """Per-worker gauges from the latest load report, read when Prometheus scrapes."""

    def __init__(self, pool: WorkerPool, model_name: str) -> None:
        self._pool = pool
        self._model = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        labels = [MODEL_LABEL, "role", "worker"]
        running = GaugeMetricFamily(
            "pdserve:num_requests_running", "Running on workers.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "pdserve:num_requests_waiting", "Waiting on workers.", labels=labels
        )
        usage = GaugeMetricFamily(
            "pdserve:kv_cache_usage_perc", "KV cache usage (0-1).", labels=labels
        )
        depth = GaugeMetricFamily(
            "pdserve:worker_queue_depth",
            "Requests accepted by the worker and not finished (what autoscalers read).",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "pdserve:worker_healthy", "1 when the worker is healthy.", labels=labels
        )
        preemptions = CounterMetricFamily(
            "pdserve:num_preemptions", "Preemptions on workers.", labels=labels
        )
        transfer_bytes = CounterMetricFamily(
            "pdserve:kv_transfer_bytes", "KV bytes pulled by decode workers.", labels=labels
        )
        transfer_seconds = CounterMetricFamily(
            "pdserve:kv_transfer_seconds", "Seconds decode workers spent pulling KV.", labels=labels
        )
        prefix_queries = CounterMetricFamily(
            "pdserve:prefix_cache_queries",
            "Prompt tokens workers looked up in their prefix cache.",
            labels=labels,
        )
        prefix_hits = CounterMetricFamily(
            "pdserve:prefix_cache_hits",
            "Prompt tokens workers' prefix caches served.",
            labels=labels,
        )
        indexed = GaugeMetricFamily(
            "pdserve:prefix_index_blocks",
            "Block hashes the gateway's KV-event index holds for the worker.",
            labels=labels,
        )
        spec = _SpecDecodeFamilies(labels)
        engine = _EngineHistograms(labels)
        for w in self._pool.workers:
            key = [self._model, w.role, w.address]
            healthy.add_metric(key, 1.0 if w.healthy else 0.0)
            indexed.add_metric(key, len(self._pool.index.hashes(w.address)))
            if w.load is None:
                continue
            running.add_metric(key, w.load.num_running)
            depth.add_metric(key, w.load.queue_depth)
            waiting.add_metric(key, w.load.num_waiting)
            usage.add_metric(key, w.load.kv_cache_usage)
            preemptions.add_metric(key, w.load.num_preemptions)
            prefix_queries.add_metric(key, w.load.prefix_cache_queries)
            prefix_hits.add_metric(key, w.load.prefix_cache_hits)
            engine.add(key, w.load)
            if w.role == "decode":
                transfer_bytes.add_metric(key, w.load.kv_transfer_bytes_total)
                transfer_seconds.add_metric(key, w.load.kv_transfer_seconds_total)
                spec.add(key, w.load)
        yield from (running, waiting, usage, healthy, preemptions, transfer_bytes, transfer_seconds)
        yield from (prefix_queries, prefix_hits, indexed, depth)
        yield from spec.families()
        yield from engine.families()


class _EngineHistograms:
    """Histograms the workers' engines measure, under vLLM's names (pdserve: prefix)."""

    def __init__(self, labels: list[str]) -> None:
        self.queue_time = HistogramMetricFamily(
            "pdserve:request_queue_time_seconds",
            "Arrival in a worker's engine until first scheduled (imported KV: the pull included).",
            labels=labels,
        )
        self.iteration_tokens = HistogramMetricFamily(
            "pdserve:iteration_tokens_total",
            "Tokens scheduled per engine step (prompt chunks, decode tokens, proposals).",
            labels=labels,
        )

    def add(self, key: list[str], load) -> None:  # noqa: ANN001
        for family, snap in ((self.queue_time, load.queue_time),
                             (self.iteration_tokens, load.iteration_tokens)):  # fmt: skip
            if snap is not None:
                family.add_metric(key, _buckets(snap), snap.sum)

    def families(self):
        return self.queue_time, self.iteration_tokens


def _buckets(snap: HistogramSnapshot) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs, +Inf last, `le` spelt as prometheus_client spells it."""
    bounds = (*snap.bounds, math.inf)
    return [(floatToGoString(b), c) for b, c in zip(bounds, snap.counts, strict=True)]


class _SpecDecodeFamilies:
    """Speculative decoding on decode workers, under vLLM's names (pdserve: prefix)."""

    def __init__(self, labels: list[str]) -> None:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"pdserve:spec_decode_{name}", doc, labels=labels)

        self.drafts = counter("num_drafts", "Verify steps of one request that carried proposals.")
        self.draft_tokens = counter("num_draft_tokens", "Tokens proposed.")
        self.accepted = counter("num_accepted_tokens", "Proposed tokens accepted.")
        self.emitted = counter("num_emitted_tokens", "Tokens emitted by verify steps.")
        self.per_pos = CounterMetricFamily(
            "pdserve:spec_decode_num_accepted_tokens_per_pos",
            "Verify steps that accepted the proposal at this position (0: the first).",
            labels=[*labels, "position"],
        )
        self.rate = GaugeMetricFamily(
            "pdserve:spec_decode_draft_acceptance_rate",
            "Accepted / proposed tokens since the worker started.",
            labels=labels,
        )
        self.length = GaugeMetricFamily(
            "pdserve:spec_decode_mean_acceptance_length",
            "Tokens emitted per verify step (1 + accepted / drafts) since the worker started.",
            labels=labels,
        )

    def add(self, key: list[str], load) -> None:  # noqa: ANN001
        self.drafts.add_metric(key, load.spec_decode_num_drafts)
        self.draft_tokens.add_metric(key, load.spec_decode_num_draft_tokens)
        self.accepted.add_metric(key, load.spec_decode_num_accepted_tokens)
        self.emitted.add_metric(key, load.spec_decode_num_emitted_tokens)
        for pos, count in enumerate(load.spec_decode_num_accepted_tokens_per_pos):
            self.per_pos.add_metric([*key, str(pos)], count)
        drafts, proposed = load.spec_decode_num_drafts, load.spec_decode_num_draft_tokens
        accepted = load.spec_decode_num_accepted_tokens
        self.rate.add_metric(key, accepted / proposed if proposed else 0.0)
        self.length.add_metric(key, 1.0 + accepted / drafts if drafts else 0.0)

    def families(self):
        return (
            self.drafts, self.draft_tokens, self.accepted, self.emitted, self.per_pos, self.rate,
            self.length,
        )  # fmt: skip
