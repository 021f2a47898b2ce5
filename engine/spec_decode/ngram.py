"""Prompt lookup (vLLM's "ngram"): propose the tokens that followed the latest earlier
occurrence of the sequence's last n tokens, for the longest n in [min, max] that occurs."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, lookup_min: int, lookup_max: int) -> None:
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k proposed tokens (possibly none) continuing `token_ids`."""
        seq = np.asarray(token_ids, dtype=np.int64)
        total = len(seq)
        for n in range(min(self.lookup_max, total - 1), self.lookup_min - 1, -1):
            # Windows that start before the suffix and leave at least one token after them.
            windows = sliding_window_view(seq[: total - 1], n)  # (total - n, n)
            hits = np.flatnonzero((windows == seq[total - n :]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return seq[start : start + k].tolist()
        return []
