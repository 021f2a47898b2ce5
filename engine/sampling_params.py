"""Sampling parameters, with vLLM's field names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from contract.limits import MAX_LOGPROBS as _MAX_LOGPROBS
from contract.structured import StructuredOutputs

StructuredOutputsParams = StructuredOutputs  # vLLM's name


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = (
        None  # number of top logprobs per sampled token (0: only the sampled one)
    )
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # compiled by the engine (xgrammar)
    # Logprob of each prompt token given those before it, plus the top-N alternatives (0: the
    # prompt token's alone). Such a request reads nothing from the prefix cache.
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] = field(default_factory=list)  # non-empty: only these
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits
    bad_words: list[str] = field(default_factory=list)  # never generated (as token sequences)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.allowed_token_ids = list(self.allowed_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        # vLLM's clamp: a bias outside [-100, 100] acts as the bound.
        self.logit_bias = {
            k: min(100.0, max(-100.0, float(v))) if math.isfinite(v) else float(v)
            for k, v in (self.logit_bias or {}).items()
        }
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.repetition_penalty > 0.0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= _MAX_LOGPROBS,
                f"logprobs must be in [0, {_MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= _MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative integers",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids),
                "allowed_token_ids must be non-negative integers",
            ),
            (
                all(isinstance(w, str) and w.strip() for w in self.bad_words),
                "bad_words must be non-empty strings",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.logit_bias),
                "logit_bias keys must be non-negative token ids",
            ),
            (
                all(math.isfinite(v) for v in self.logit_bias.values()),
                "logit_bias values must be finite numbers",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputs):
                raise ValueError("structured_outputs must be StructuredOutputsParams")
            self.structured_outputs.check()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone(self, **changes) -> SamplingParams:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["stop"] = list(self.stop)
        values["stop_token_ids"] = list(self.stop_token_ids)
        values["allowed_token_ids"] = list(self.allowed_token_ids)
        values["logit_bias"] = dict(self.logit_bias)
        values["bad_words"] = list(self.bad_words)
        values.update(changes)
        return SamplingParams(**values)
