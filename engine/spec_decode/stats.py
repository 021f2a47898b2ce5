"""Speculative decoding counters, as vLLM exports them (cumulative since the engine started)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecDecodeStats:
    num_drafts: int = 0  # verify steps of one request that carried proposals
    num_draft_tokens: int = 0  # tokens proposed
    num_accepted_tokens: int = 0  # proposals the target accepted
    num_emitted_tokens: int = 0  # tokens emitted by verify steps (accepted + one per step)
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: drafts accepting position i

    def observe(self, num_proposed: int, num_accepted: int, num_emitted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_emitted
        if len(self.accepted_per_pos) < num_proposed:
            self.accepted_per_pos += [0] * (num_proposed - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify step (accepted + the one each step emits anyway), vLLM's measure."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            self.num_emitted_tokens,
            list(self.accepted_per_pos),
        )
