"""Scheduler policy without a model: budgets, chunked prefill, preemption."""

import time

from contract.histogram import ITERATION_TOKENS_BUCKETS, QUEUE_TIME_BUCKETS
from engine.block_pool import BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def make(num_blocks=16, block_size=4, max_seqs=8, budget=32):
    kv = KVCacheManager(BlockPool(num_blocks), block_size)
    return Scheduler(kv, max_seqs, budget), kv


def fake_step(sched_out):
    """What the engine does after a step: count computed tokens, sample one token if done."""
    for s in sched_out.scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
        if s.request.num_computed_tokens == s.request.num_tokens:
            s.request.append_token(1)


def test_token_budget_chunks_a_long_prompt():
    sched, _ = make(budget=8)
    r = Request("r", list(range(20)), SamplingParams())
    sched.add(r)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append(out.scheduled[0].num_new_tokens)
        fake_step(out)
    assert chunks == [8, 8, 4]
    assert r.num_output_tokens == 1


def test_decodes_go_first_and_max_num_seqs_holds():
    sched, _ = make(max_seqs=2, budget=100)
    reqs = [Request(str(i), [1, 2, 3], SamplingParams()) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["0", "1"]
    fake_step(out)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("0", 1), ("1", 1)]
    sched.finish(reqs[0], "stop")
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["1", "2"]


def test_preemption_by_recompute_when_blocks_run_out():
    sched, kv = make(num_blocks=4, block_size=2, budget=100)
    a = Request("a", [1, 2, 3], SamplingParams())
    b = Request("b", [4, 5, 6], SamplingParams())
    sched.add(a)
    sched.add(b)
    fake_step(sched.schedule())  # each holds 2 blocks (3 prompt tokens + room for 1)
    assert kv.pool.num_free_blocks == 0
    fake_step(sched.schedule())  # 4 tokens each now: fits exactly
    out = sched.schedule()  # 5th token needs a new block: b (newest) is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    kv.pool.check_integrity()
    fake_step(out)
    sched.finish(a, "stop")
    out = sched.schedule()  # b comes back and recomputes prompt + its output so far
    assert out.scheduled[0].request is b and out.scheduled[0].num_new_tokens == b.num_tokens
    assert sched.num_preemptions == 1
    assert sched.queue_time.snapshot().count == 2  # b's readmission: no second queue time


def test_queue_time_ends_at_first_schedule_and_steps_count_their_tokens():
    sched, _ = make(max_seqs=1, budget=8)
    first = Request("first", list(range(10)), SamplingParams())
    late = Request("late", [1, 2, 3], SamplingParams(), arrival_time=time.monotonic() - 2.0)
    sched.add(first)
    sched.add(late)
    out = sched.schedule()  # max_num_seqs keeps late waiting
    assert [(x.request, x.num_new_tokens) for x in out.scheduled] == [(first, 8)]
    assert sched.queue_time.snapshot().count == 1 and late.scheduled_time is None
    fake_step(out)
    fake_step(sched.schedule())  # first's last 2 prompt tokens
    sched.finish(first, "stop")
    fake_step(sched.schedule())  # late: 3 prompt tokens, its queue time ends
    assert late.scheduled_time is not None
    assert sched.schedule().scheduled[0].num_new_tokens == 1  # late decodes
    queue = sched.queue_time.snapshot()
    assert queue.count == 2 and queue.sum >= 2.0
    le = dict(zip(QUEUE_TIME_BUCKETS, queue.counts, strict=False))
    assert le[1.5] == 1 and le[2.5] == 2  # late waited 2 s (plus the test's own microseconds)
    steps = sched.iteration_tokens.snapshot()
    assert (steps.count, steps.sum) == (4, 8 + 2 + 3 + 1)
    le = dict(zip(ITERATION_TOKENS_BUCKETS, steps.counts, strict=False))
    assert (le[1], le[8]) == (1, 4)
    sched.finish(late, "stop")
    assert not sched.schedule().scheduled
    assert sched.iteration_tokens.snapshot().count == 4  # an empty schedule is no step
