"""`--speculative-config`: vLLM's field names, validated at construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model")
# Above this many running requests a step decodes without proposals: at larger batches a
# step is no longer dominated by fixed cost, so verifying k + 1 rows per request costs more than
# the accepted tokens save. Two runs of `pdserve bench speculative --also-always-on`
# (docs/benchmarks.md, "Speculative decoding"): always-on gains up to batch 8 to 12 on a
# half-copying workload and loses from 16 up (0.86x to 0.92x at 32); 4 is the conservative end,
# since free text (acceptance 0.25) gains less than that workload.
DEFAULT_DISABLE_BY_BATCH_SIZE = 4


@dataclass(slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: proposals per step; the verify pass scores k + 1 rows
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up in the sequence so far
    prompt_lookup_min: int = 2  # ngram: shortest suffix that counts as a match
    model: str | None = None  # draft_model: local HF folder of a model with the same tokenizer
    # Steps with more running requests than this decode without speculation (vLLM's name).
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens must be an integer >= 1, got {self.num_speculative_tokens!r}"
            )
        if self.method == "ngram":
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ValueError(
                    "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                    f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
                )
        elif not self.model:
            raise ValueError('method "draft_model" needs "model": a local model folder')
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(
                f"disable_by_batch_size must be >= 1 or null, got {self.disable_by_batch_size}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> SpeculativeConfig:
        if not isinstance(data, dict):
            raise ValueError(f"speculative config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown speculative config fields {sorted(unknown)}; known: {sorted(known)}"
            )
        if "method" not in data:
            raise ValueError('speculative config needs "method" ("ngram" or "draft_model")')
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--speculative-config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    def __str__(self) -> str:  # the command-line spelling (a launcher passes it on to workers)
        return self.to_json()
