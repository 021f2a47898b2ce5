"""The persistent input batch (vLLM v1's InputBatch): block tables live in one preallocated
array, one row per request, updated by what changed since the last step.

A step's tensors are then cut from these arrays with one vectorised gather, instead of being
rebuilt from every request's Python lists each step.

Invariants:
- `rows[request]` is the row mirroring `request.block_ids`; `known[row]` of its ids are copied.
- Block ids only grow by `extend` while a request holds its blocks; freeing them
  (KVCacheManager.free) or rolling back its tail (KVCacheManager.trim) replaces the list
  object, so a row whose list is not the request's
  current one is rewritten from scratch.
- A row is reused only when its request was not scheduled in the current step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class StepArrays:
    """Host arrays for one step, in schedule order."""

    input_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slot_mapping: np.ndarray  # (T,) int64
    block_tables: np.ndarray  # (B, max_blocks) int32
    context_lens: np.ndarray  # (B,) int32
    query_lens: np.ndarray  # (B,) int32
    cu_seqlens_q: np.ndarray  # (B + 1,) int32
    logits_indices: np.ndarray  # (S,) int64: last token of each sampling request


class InputBatch:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.block_size = block_size
        self.block_table = np.zeros((max_rows, max_blocks_per_seq), dtype=np.int32)
        self.known = np.zeros(max_rows, dtype=np.int64)
        self.rows: dict[object, int] = {}
        self._lists: list[list[int] | None] = [None] * max_rows
        self._free = list(range(max_rows - 1, -1, -1))

    @property
    def max_rows(self) -> int:
        return self.block_table.shape[0]

    def prepare(self, sched: SchedulerOutput) -> StepArrays:
        """Arrays for `sched.scheduled`: items with `request`, `start`, `num_new_tokens`,
        `num_logits` and `input_token_ids()` (a ScheduledRequest, or a draft model's step)."""
        items = sched.scheduled
        requests = [s.request for s in items]
        rows = np.fromiter((self._sync(r, requests) for r in requests), np.int64, len(requests))
        starts = np.fromiter((s.start for s in items), np.int64, len(requests))
        qlens = np.fromiter((s.num_new_tokens for s in items), np.int64, len(requests))
        ctx = starts + qlens
        cu = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(qlens, out=cu[1:])
        seq_of_token = np.repeat(np.arange(len(requests)), qlens)
        positions = starts[seq_of_token] + (np.arange(cu[-1]) - cu[:-1][seq_of_token])
        bs = self.block_size
        max_blocks = int(-(-ctx.max() // bs))
        tables = self.block_table[rows, :max_blocks]  # (B, max_blocks), a fresh copy
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        tokens = np.empty(cu[-1], dtype=np.int64)
        for b, s in enumerate(items):
            tokens[cu[b] : cu[b + 1]] = s.input_token_ids()
        # The last num_logits rows of each sequence (0 for a prefill chunk that does not sample).
        nlog = np.fromiter((s.num_logits for s in items), np.int64, len(requests))
        first = np.repeat(cu[1:] - nlog, nlog)  # (S,) each sampled row's sequence's first
        logits_indices = first + np.arange(len(first)) - np.repeat(np.cumsum(nlog) - nlog, nlog)
        return StepArrays(
            input_ids=tokens,
            positions=positions,
            slot_mapping=slots,
            block_tables=tables,
            context_lens=ctx.astype(np.int32),
            query_lens=qlens.astype(np.int32),
            cu_seqlens_q=cu.astype(np.int32),
            logits_indices=logits_indices,
        )

    def _sync(self, request, step_requests: list) -> int:
        """The row of `request`, with its block ids brought up to date."""
        row = self.rows.get(request)
        if row is None:
            row = self._take_row(step_requests)
            self.rows[request] = row
            self._lists[row] = None
        ids = request.block_ids
        if self._lists[row] is not ids:  # new request, or its blocks were freed and reallocated
            self._lists[row] = ids
            self.known[row] = 0
        have = int(self.known[row])
        if len(ids) > have:
            if len(ids) > self.block_table.shape[1]:
                raise ValueError(
                    f"request holds {len(ids)} blocks, more than the batch's "
                    f"{self.block_table.shape[1]} per sequence"
                )
            self.block_table[row, have : len(ids)] = ids[have:]
            self.known[row] = len(ids)
        return row

    def _take_row(self, step_requests: list) -> int:
        if not self._free:
            # Reclaim rows of requests not in this step (finished, preempted or waiting).
            in_step = set(map(id, step_requests))
            for request, row in list(self.rows.items()):
                if id(request) not in in_step:
                    del self.rows[request]
                    self._lists[row] = None
                    self._free.append(row)
        if not self._free:
            raise ValueError(f"more than {self.max_rows} requests in one step")
        return self._free.pop()
