"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step: running requests first (in arrival order), each gets the tokens it still needs up to
the remaining budget; when blocks run out, the most recently admitted running request is
preempted (blocks freed, recomputed later). Then waiting requests are admitted while budget,
`max_num_seqs` and blocks allow. Policy lives here; the engine only executes what this returns.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from contract.histogram import ITERATION_TOKENS_BUCKETS, QUEUE_TIME_BUCKETS, Histogram
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    # Proposed tokens verified this step: the last len(spec_token_ids) of num_new_tokens.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this step finishes the request's pending tokens, so a token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens + len(
            self.spec_token_ids
        )

    # What the input batch reads (a draft model's steps provide the same three).
    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def prompt_logit_positions(self) -> range:
        """Positions of this chunk whose logits give prompt logprobs (position p: those of
        prompt token p + 1), skipping what an earlier, preempted run already computed.

        Invariant: they end where the sampled row starts (p < num_prompt_tokens - 1, and
        a request with prompt logprobs pending has no output yet) or at the chunk's end, so
        with the sampled rows they are the chunk's last `num_logits` rows."""
        r = self.request
        if r.prompt_logprobs is None:
            return range(0)
        end = min(self.start + self.num_new_tokens, r.num_prompt_tokens - 1)
        return range(max(self.start, len(r.prompt_logprobs)), end)

    @property
    def num_logits(self) -> int:
        """Rows whose logits are returned: prompt-logprob rows, then (when it samples) the last
        one plus one per proposal."""
        sampled = 1 + len(self.spec_token_ids) if self.samples else 0
        return len(self.prompt_logit_positions) + sampled

    def input_token_ids(self) -> list[int]:
        r = self.request
        if self.spec_token_ids:
            return r.all_token_ids[r.num_computed_tokens :] + self.spec_token_ids
        return r.all_token_ids[r.num_computed_tokens : r.num_computed_tokens + self.num_new_tokens]


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Cumulative, as vLLM exports them: seconds from arrival to first scheduled, per
        # request; tokens scheduled (prompt chunks, decode tokens, proposals), per step.
        self.queue_time = Histogram(QUEUE_TIME_BUCKETS)
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if out.scheduled:  # the engine runs a step exactly when something is scheduled
            self.iteration_tokens.observe(sum(s.num_new_tokens for s in out.scheduled))
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            pending = request.num_tokens - request.num_computed_tokens
            spec = request.spec_token_ids if pending == 1 else []
            num_new = min(pending + len(spec), budget)
            spec = spec[: max(0, num_new - pending)]  # the budget may cut proposals short
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()  # newest admission goes first
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, spec))
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            first_admission = not request.block_ids and request.num_preemptions == 0
            reads_cache = request.reads_prefix_cache and not request.block_ids
            hits = self.kv.find_prefix_hits(request) if reads_cache else []
            pending = (
                request.num_tokens - request.num_computed_tokens - len(hits) * self.kv.block_size
            )
            num_new = min(pending, budget)
            if not self.kv.allocate(request, num_new, hits):
                break
            if first_admission and reads_cache:  # a request that skips the cache asks nothing
                request.num_cached_tokens = len(hits) * self.kv.block_size
                self.kv.count_lookup(request.num_prompt_tokens, len(hits))
            self.waiting.popleft()
            self._end_queue_time(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _end_queue_time(self, request: Request) -> None:
        """The first admission ends the queue time: the first tokens computed, or for imported
        KV the first decode step (so a decode worker's includes pulling the KV, as vLLM's does
        waiting for remote KV). Readmission after a preemption does not count again."""
        if request.scheduled_time is None:
            request.scheduled_time = time.monotonic()
            self.queue_time.observe(request.scheduled_time - request.arrival_time)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.reset_speculation()
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        out.scheduled = [s for s in out.scheduled if s.request is not request]
        out.preempted.append(request)

    def finish(self, request: Request, reason: str, *, keep_blocks: bool = False) -> None:
        """Remove a request from the queues; free its blocks unless they are being held."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        request.finish_reason = reason
        if keep_blocks:
            request.status = RequestStatus.HELD
        else:
            self.kv.free(request)
            request.status = RequestStatus.FINISHED
