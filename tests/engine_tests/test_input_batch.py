"""The persistent input batch: rows follow requests' block ids across steps, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from engine.input_batch import InputBatch
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput


def _request(rid: str, n_prompt: int, blocks: list[int]) -> Request:
    r = Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=8))
    r.block_ids = list(blocks)
    return r


def _step(*pairs) -> SchedulerOutput:
    return SchedulerOutput(scheduled=[ScheduledRequest(r, n) for r, n in pairs])


def test_prefill_then_decode_arrays():
    batch = InputBatch(max_rows=4, max_blocks_per_seq=8, block_size=4)
    a = _request("a", 6, [5, 2])
    b = _request("b", 3, [7])
    out = batch.prepare(_step((a, 6), (b, 3)))
    assert out.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert out.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert out.slot_mapping.tolist() == [20, 21, 22, 23, 8, 9, 28, 29, 30]
    assert out.block_tables.tolist() == [[5, 2], [7, 0]]
    assert out.cu_seqlens_q.tolist() == [0, 6, 9]
    assert out.logits_indices.tolist() == [5, 8]
    # decode: a grows into a third block, b stays in its first
    a.num_computed_tokens, b.num_computed_tokens = 6, 3
    a.append_token(50)
    a.append_token(51)
    a.num_computed_tokens = 7
    a.block_ids.append(9)
    b.append_token(60)
    out = batch.prepare(_step((a, 1), (b, 1)))
    assert out.input_ids.tolist() == [51, 60]
    assert out.positions.tolist() == [7, 3]
    assert out.slot_mapping.tolist() == [2 * 4 + 3, 7 * 4 + 3]
    assert out.context_lens.tolist() == [8, 4]
    assert out.block_tables.tolist() == [[5, 2], [7, 0]]
    a.block_ids.append(11)
    a.num_computed_tokens = 8
    a.append_token(52)
    out = batch.prepare(
        _step(
            (a, 1),
        )
    )
    assert out.block_tables.tolist() == [[5, 2, 9]]
    assert out.slot_mapping.tolist() == [9 * 4]


def test_freed_blocks_rewrite_the_row():
    batch = InputBatch(max_rows=2, max_blocks_per_seq=4, block_size=4)
    a = _request("a", 5, [3, 1])
    batch.prepare(_step((a, 5)))
    a.block_ids = [0, 2]  # what KVCacheManager.free + a later allocate do: a new list
    out = batch.prepare(_step((a, 5)))
    assert out.block_tables.tolist() == [[0, 2]]


def test_rows_are_reclaimed_from_requests_not_in_the_step():
    batch = InputBatch(max_rows=2, max_blocks_per_seq=4, block_size=4)
    reqs = [_request(str(i), 2, [i]) for i in range(5)]
    for r in reqs:  # five requests one after another through two rows
        out = batch.prepare(_step((r, 2)))
        assert out.block_tables.tolist() == [[int(r.request_id)]]
    assert len(batch.rows) <= 2


def test_too_many_requests_in_one_step_is_a_clear_error():
    batch = InputBatch(max_rows=2, max_blocks_per_seq=4, block_size=4)
    reqs = [_request(str(i), 2, [i]) for i in range(3)]
    with pytest.raises(ValueError, match="more than 2 requests"):
        batch.prepare(_step(*[(r, 2) for r in reqs]))


def test_block_table_is_a_copy():
    batch = InputBatch(max_rows=2, max_blocks_per_seq=4, block_size=4)
    a = _request("a", 2, [3])
    out = batch.prepare(_step((a, 2)))
    out.block_tables[0, 0] = 99
    assert np.array_equal(batch.prepare(_step((a, 2))).block_tables, [[3]])
