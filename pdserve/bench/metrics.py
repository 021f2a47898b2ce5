"""Serving metrics from per-request outputs, named like `vllm bench serve`'s result JSON."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pdserve.bench.client import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(slots=True, frozen=True)
class LatencyStats:
    """One latency metric in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        ms = np.asarray(seconds if len(seconds) else [0.0], dtype=np.float64) * 1000.0
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            percentiles={p: float(np.percentile(ms, p)) for p in percentiles},
        )


@dataclass(slots=True)
class Timeline:
    """Per-second series from the start of the benchmark, for `max_*` metrics and plots."""

    output_tokens_per_s: list[int] = field(default_factory=list)
    concurrent_requests_per_s: list[int] = field(default_factory=list)


@dataclass(slots=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration: float
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float | None  # None when no --goodput SLO was given
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    latencies: dict[str, LatencyStats]  # keyed by METRICS
    samples: dict[str, list[float]]  # seconds, keyed by METRICS (for plots)
    output_lens: list[int]  # per request, 0 for failures
    timeline: Timeline


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's key spelling)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def output_len(out: RequestOutput, count_tokens: Callable[[str], int] | None) -> int:
    """Generated tokens: the server's usage, else a tokenizer count, else streamed chunks."""
    if out.output_tokens is not None:
        return out.output_tokens
    if count_tokens is not None:
        return count_tokens(out.generated_text)
    return len(out.chunk_times)


def tpot(out: RequestOutput, n_out: int) -> float | None:
    """Mean time per output token after the first; None for one-token outputs."""
    if n_out <= 1:
        return None
    return (out.latency - out.ttft) / (n_out - 1)


def meets_slo(out: RequestOutput, n_out: int, slo_ms: dict[str, float]) -> bool:
    values = {"ttft": out.ttft, "tpot": tpot(out, n_out) or 0.0, "e2el": out.latency}
    return all(values[name] * 1000.0 <= limit for name, limit in slo_ms.items())


def build_timeline(outputs: Sequence[RequestOutput], start: float, duration: float) -> Timeline:
    """Tokens (one per streamed chunk) and requests in flight, in one-second buckets."""
    n = max(1, math.ceil(duration) + 1)
    tokens, active = [0] * n, [0] * n
    for out in outputs:
        if not out.success:
            continue
        for t in out.chunk_times:
            tokens[min(n - 1, max(0, int(t - start)))] += 1
        first = max(0, int(out.start_time - start))
        last = min(n - 1, int(out.start_time + out.latency - start))
        for second in range(first, last + 1):
            active[second] += 1
    return Timeline(tokens, active)


def calculate_metrics(
    outputs: Sequence[RequestOutput],
    duration: float,
    start: float,
    percentiles: Sequence[float],
    count_tokens: Callable[[str], int] | None = None,
    goodput_slo_ms: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    samples: dict[str, list[float]] = {name: [] for name in METRICS}
    output_lens, total_input, good = [], 0, 0
    for out in outputs:
        if not out.success:
            output_lens.append(0)
            continue
        n_out = output_len(out, count_tokens)
        output_lens.append(n_out)
        total_input += out.prompt_len
        samples["ttft"].append(out.ttft)
        samples["itl"].extend(out.itl)
        samples["e2el"].append(out.latency)
        per_token = tpot(out, n_out)
        if per_token is not None:
            samples["tpot"].append(per_token)
        if goodput_slo_ms and meets_slo(out, n_out, goodput_slo_ms):
            good += 1
    completed = sum(1 for out in outputs if out.success)
    total_output = sum(output_lens)
    timeline = build_timeline(outputs, start, duration)
    return BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        duration=duration,
        total_input=total_input,
        total_output=total_output,
        request_throughput=completed / duration,
        request_goodput=good / duration if goodput_slo_ms else None,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        max_output_tokens_per_s=float(max(timeline.output_tokens_per_s)),
        max_concurrent_requests=max(timeline.concurrent_requests_per_s),
        latencies={name: LatencyStats.of(samples[name], percentiles) for name in METRICS},
        samples=samples,
        output_lens=output_lens,
        timeline=timeline,
    )


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput expects NAME:MS with NAME in {GOODPUT_METRICS}, got {item!r}"
            )
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if slo[name] < 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be >= 0 ms")
    return slo
