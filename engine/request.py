"""A request is described by counters, not phases.

Prefill, chunked prefill, prefix-cache hits, imported KV, recompute after preemption and decode
all reduce to one rule: bring `num_computed_tokens` up to `num_tokens` within the step's budget.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from contract.text import TextStream
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    RESERVED = "reserved"  # blocks allocated for imported KV, not yet committed
    HELD = "held"  # prefill done, blocks kept for a transfer
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # when the scheduler first gave it tokens (monotonic)
    status: RequestStatus = RequestStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full, computed blocks
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # With params.prompt_logprobs: those of prompt positions 1.. computed so far (entry i from
    # the logits at position i), until they go out with the first token; None: not asked, or
    # handed out. While it is a list, no prompt token may come from the prefix cache.
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    generator: object | None = None  # torch.Generator when params.seed is set
    text: TextStream | None = None  # with stop strings: the detokenized output, matched as it grows
    matcher: object | None = None  # xgrammar GrammarMatcher when params.structured_outputs is set
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # from params.bad_words
    # Speculative decoding: proposals to verify next step (and the draft's distributions for
    # them, (k, V), or None for point-mass proposals); the draft model's KV covers positions
    # [0, num_draft_computed) plus `draft_written` proposals after them (checked when reused).
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: object | None = None
    num_draft_computed: int = 0
    draft_written: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def reads_prefix_cache(self) -> bool:
        """False while prompt logprobs are being computed: a cached position has no logits
        (the request still enters its own full blocks into the cache)."""
        return self.prompt_logprobs is None

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def reset_speculation(self) -> None:
        """Forget proposals and the draft's KV (blocks freed: preemption)."""
        self.spec_token_ids = []
        self.spec_probs = None
        self.num_draft_computed = 0
        self.draft_written = []
