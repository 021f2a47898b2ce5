"""Cumulative histograms as Prometheus reads them: `le` bounds inclusive, +Inf last, a sum."""

from __future__ import annotations

import math

import pytest

from contract.histogram import (
    ITERATION_TOKENS_BUCKETS,
    QUEUE_TIME_BUCKETS,
    Histogram,
    HistogramSnapshot,
)


def test_observations_land_in_the_first_bucket_whose_bound_they_do_not_exceed():
    h = Histogram((1.0, 5.0, 10.0))
    for value in (0.0, 1.0, 1.5, 5.0, 10.0, 10.5, 1e9):
        h.observe(value)
    snap = h.snapshot()
    # <= 1: 0, 1;  <= 5: + 1.5, 5;  <= 10: + 10;  +Inf: + 10.5, 1e9
    assert snap.counts == (2, 4, 5, 7)
    assert snap.count == 7
    assert snap.sum == pytest.approx(0.0 + 1.0 + 1.5 + 5.0 + 10.0 + 10.5 + 1e9)
    assert snap.bounds == (1.0, 5.0, 10.0)


def test_snapshot_is_a_copy_and_counts_stay_cumulative():
    h = Histogram(ITERATION_TOKENS_BUCKETS)
    empty = h.snapshot()
    assert empty == HistogramSnapshot.empty(ITERATION_TOKENS_BUCKETS)
    h.observe(8)
    h.observe(9)
    h.observe(20000)
    assert empty.count == 0 and empty.sum == 0.0
    snap = h.snapshot()
    le = dict(zip((*ITERATION_TOKENS_BUCKETS, math.inf), snap.counts, strict=True))
    assert (le[1], le[8], le[16], le[16384], le[math.inf]) == (0, 1, 2, 2, 3)
    assert list(snap.counts) == sorted(snap.counts)
    assert snap.sum == 8 + 9 + 20000


@pytest.mark.parametrize(
    "bounds,match",
    [((), "at least one"), ((1.0, 1.0), "increase"), ((2.0, 1.0), "increase"),
     ((1.0, math.inf), "finite")],
)  # fmt: skip
def test_bad_bounds_are_refused(bounds, match):
    with pytest.raises(ValueError, match=match):
        Histogram(bounds)


def test_snapshot_needs_one_count_per_bound_and_one_for_inf():
    with pytest.raises(ValueError, match="counts"):
        HistogramSnapshot((1.0, 2.0), (0, 0))


def test_declared_bounds_are_vllms():
    assert QUEUE_TIME_BUCKETS[0] == 0.3 and QUEUE_TIME_BUCKETS[-3:] == (960.0, 1920.0, 7680.0)
    assert len(QUEUE_TIME_BUCKETS) == 21
    assert ITERATION_TOKENS_BUCKETS == (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                        16384)  # fmt: skip
    for bounds in (QUEUE_TIME_BUCKETS, ITERATION_TOKENS_BUCKETS):
        Histogram(bounds)  # valid: finite, strictly increasing
