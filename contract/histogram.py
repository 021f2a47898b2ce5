"""Cumulative histograms with fixed bucket bounds: the engine observes, the gateway exports.

Prometheus's shape: bucket i counts the observations <= bounds[i] (its `le`, inclusive) and a
last bucket, +Inf, counts all of them. The bounds of each histogram the workers report are
declared here, once, so a load report carries only the counts and the sum.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

# vLLM's buckets for request_queue_time_seconds (its request_latency_buckets): the gateway's
# e2e latency buckets (gateway/metrics.py) and two more, 1920 and 7680 s.
QUEUE_TIME_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM's buckets for iteration_tokens_total. Not clipped to --max-num-batched-tokens: the bounds
# are fixed on both sides of the wire, and buckets above the budget only repeat the total.
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram at one moment. `counts[i]`: observations <= `bounds[i]`, cumulative; the
    last of the len(bounds) + 1 counts is the +Inf bucket, i.e. every observation."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(
                f"{len(self.counts)} counts for {len(self.bounds)} bounds (want one more: +Inf)"
            )

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> HistogramSnapshot:
        return cls(bounds, (0,) * (len(bounds) + 1))

    @property
    def count(self) -> int:
        return self.counts[-1]


class Histogram:
    """Counts observations per bucket and their sum, cumulative since it was made. Not
    thread-safe: one thread observes (the engine's), others read snapshots."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds:
            raise ValueError("a histogram needs at least one bucket bound")
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"bucket bounds must be finite (+Inf is implied), got {bounds}")
        if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"bucket bounds must increase strictly, got {bounds}")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last: above all
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, so a value on a bound lands in that bound's
        # bucket (Prometheus's `le`); above every bound: the +Inf bucket.
        self._counts[bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(accumulate(self._counts)), self._sum)
