"""Request arrival times: all at once, Poisson, or gamma (bursty) arrivals."""

from __future__ import annotations

import math
import random


def arrival_offsets(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each of `num` requests is sent.

    Gaps are gamma-distributed with mean 1/request_rate and shape `burstiness`: 1.0 gives a
    Poisson process, < 1 burstier traffic, > 1 more uniform. An infinite rate sends all at t=0.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.gammavariate(burstiness, scale)
    return offsets
