"""Which requests speculate this step, how far, and what the proposers say.

A request proposes only while it decodes (its one pending token is its newest), never as a
prefill-only request. Proposals stop short of max_tokens and max_model_len. Under a
structured-output grammar, n-gram proposals (point masses) are cut at the first token the grammar
refuses, which verification would reject for certain; a draft model's sampled proposals are kept
whole, since cutting them would change what the residual draws from (the verifier masks every
row, so a refused proposal is rejected exactly). Above `disable_by_batch_size` running requests
nobody speculates.
"""

from __future__ import annotations

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.draft_model import DraftModelProposer
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.stats import SpecDecodeStats
from engine.structured_output import valid_prefix


class Speculator:
    def __init__(
        self,
        config: SpeculativeConfig,
        kv: KVCacheManager,
        max_model_len: int,
        draft: DraftModelProposer | None = None,
    ) -> None:
        if (config.method == "draft_model") != (draft is not None):
            raise ValueError("a draft proposer is needed exactly when method is draft_model")
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.draft = draft
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpecDecodeStats()

    def describe(self) -> str:
        c = self.config
        what = (
            f"ngram [{c.prompt_lookup_min}, {c.prompt_lookup_max}]"
            if self.draft is None
            else (f"draft model {c.model} ({self.draft.describe()})")
        )
        return f"speculative decoding: {what}, k={c.num_speculative_tokens}, off above batch {c.disable_by_batch_size}"

    def propose(self, running: list[Request], sampler: Sampler) -> None:
        """Replace every running request's proposals with this step's (possibly none)."""
        for r in running:
            if r.spec_token_ids:
                r.spec_token_ids, r.spec_probs = [], None
                self.kv.trim(r)  # blocks taken for proposals that were never verified
        limit = self.config.disable_by_batch_size
        if limit is not None and len(running) > limit:
            return
        chosen = [(r, self._budget(r)) for r in running]
        chosen = [(r, k) for r, k in chosen if k > 0]
        if self.draft is None:
            for r, k in chosen:
                proposal = self.ngram.propose(r.all_token_ids, k)
                if proposal and r.matcher is not None:
                    proposal = proposal[: valid_prefix(r.matcher, proposal)]
                r.spec_token_ids = proposal
            return
        # The draft writes KV for its own proposals: blocks for them first (none: no proposal).
        chosen = [(r, k) for r, k in chosen if self.kv.allocate(r, 1 + k)]
        if chosen:
            reqs, ks = zip(*chosen, strict=True)
            self.draft.propose(list(reqs), list(ks), sampler)

    def _budget(self, r: Request) -> int:
        """How many tokens `r` may propose now (0: it does not speculate)."""
        if (
            r.prefill_only
            or r.status != RequestStatus.RUNNING
            or r.num_computed_tokens != r.num_tokens - 1
        ):
            return 0
        k = min(self.config.num_speculative_tokens, self.max_model_len - r.num_tokens)
        if r.params.max_tokens is not None:
            # The verify step emits up to k + 1 tokens: never more than max_tokens allows.
            k = min(k, r.params.max_tokens - r.num_output_tokens - 1)
        return max(k, 0)
