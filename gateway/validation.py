"""Checks on a request's parameters and prompt, with messages a client can act on."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import jsonschema

from contract.limits import FLOAT32_MAX
from contract.sampling import SAMPLING_FIELDS
from contract.structured import StructuredOutputs
from gateway.errors import invalid
from gateway.schema import GenerationParams

INT64_MAX = 2**63 - 1


@dataclass(slots=True, frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_n: int
    max_logprobs: int
    max_stop_strings: int


def check_text(text: str, param: str) -> None:
    """Text must be valid Unicode that UTF-8 can carry (no lone surrogates) and hold no NUL."""
    if "\x00" in text:
        raise invalid(f"{param} must not contain NUL characters", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} contains a lone surrogate (invalid Unicode)", param) from None


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise invalid(
                f"token id {token_id} in {param} is out of vocabulary (size {vocab_size})", param
            )


def check_n(p: GenerationParams, limits: Limits) -> None:
    _require(1 <= p.n <= limits.max_n, f"n must be in [1, {limits.max_n}], got {p.n}", "n")


def check_wire_ranges(p: GenerationParams) -> None:
    """Every numeric field within what the worker protocol and the engine carry (contract's
    `carries`): a value past it would overflow a protobuf int32/uint32 or become inf as a
    float32 on its way to a worker."""
    for f in SAMPLING_FIELDS:
        if f.carries is None:
            continue
        value = getattr(p, f.name)
        values = value if isinstance(value, tuple | list) else (value,)
        lo, hi = f.carries
        for v in values:
            if v is None or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if isinstance(v, float) and math.isnan(v):
                continue  # the field's own check names it
            if not lo <= v <= hi:
                raise invalid(f"{f.name} must be in [{lo}, {hi}], got {v}", f.name)


def validate_params(p: GenerationParams, limits: Limits) -> None:
    """Raise GatewayError(INVALID) naming the first parameter out of range."""
    _check_sampling(p)
    _check_counts(p, limits)
    _check_stops(p, limits)
    if p.structured_outputs is not None:
        check_structured_outputs(p.structured_outputs, "structured_outputs")
    check_token_ids(p.allowed_token_ids, limits.vocab_size, "allowed_token_ids")
    for word in p.bad_words:
        _require(word.strip() != "", "bad_words must not be empty or blank", "bad_words")
        check_text(word, "bad_words")
    check_token_ids(list(p.logit_bias), limits.vocab_size, "logit_bias")
    for bias in p.logit_bias.values():
        _require(
            math.isfinite(bias) and abs(bias) <= FLOAT32_MAX,
            f"logit_bias values must be finite float32 numbers, got {bias}",
            "logit_bias",
        )
    check_wire_ranges(p)  # last: the checks above give the more specific messages


def _check_sampling(p: GenerationParams) -> None:
    _require(
        math.isfinite(p.temperature) and p.temperature >= 0,
        f"temperature must be a finite number >= 0, got {p.temperature}",
        "temperature",
    )
    _require(
        math.isfinite(p.top_p) and 0 < p.top_p <= 1,
        f"top_p must be in (0, 1], got {p.top_p}",
        "top_p",
    )
    _require(p.top_k >= -1, f"top_k must be -1, 0 (disabled) or positive, got {p.top_k}", "top_k")
    _require(
        math.isfinite(p.min_p) and 0 <= p.min_p <= 1,
        f"min_p must be in [0, 1], got {p.min_p}",
        "min_p",
    )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        _require(
            math.isfinite(value) and -2 <= value <= 2,
            f"{name} must be in [-2, 2], got {value}",
            name,
        )
    _require(
        math.isfinite(p.repetition_penalty) and 0 < p.repetition_penalty <= 2,
        f"repetition_penalty must be in (0, 2], got {p.repetition_penalty}",
        "repetition_penalty",
    )
    _require(
        p.seed is None or -INT64_MAX - 1 <= p.seed <= INT64_MAX,
        f"seed must fit in 64 bits, got {p.seed}",
        "seed",
    )


def _check_counts(p: GenerationParams, limits: Limits) -> None:
    check_n(p, limits)
    _require(
        p.max_tokens is None or p.max_tokens >= 1,
        f"max_tokens must be >= 1, got {p.max_tokens}",
        "max_tokens",
    )
    _require(p.min_tokens >= 0, f"min_tokens must be >= 0, got {p.min_tokens}", "min_tokens")
    _require(
        p.max_tokens is None or p.min_tokens <= p.max_tokens,
        f"min_tokens ({p.min_tokens}) must be <= max_tokens ({p.max_tokens})",
        "min_tokens",
    )
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        _require(
            value is None or 0 <= value <= limits.max_logprobs,
            f"{name} must be in [0, {limits.max_logprobs}], got {value}",
            name,
        )


def _check_stops(p: GenerationParams, limits: Limits) -> None:
    _require(
        len(p.stop) <= limits.max_stop_strings,
        f"at most {limits.max_stop_strings} stop strings are allowed, got {len(p.stop)}",
        "stop",
    )
    for stop in p.stop:
        _require(stop != "", "stop strings must not be empty", "stop")
        check_text(stop, "stop")
    check_token_ids(p.stop_token_ids, limits.vocab_size, "stop_token_ids")


def check_structured_outputs(spec: StructuredOutputs, param: str) -> None:
    """What can be checked without the model's vocabulary: one constraint, a valid JSON schema
    (meta-schema check), a regex Python compiles. The engine refuses what xgrammar cannot compile
    (INVALID_ARGUMENT, a 400 too)."""
    try:
        spec.check()
    except ValueError as exc:
        raise invalid(str(exc), param) from None
    if spec.json is not None:
        schema = json.loads(spec.json)
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise invalid(f"invalid JSON schema: {exc.message}", param) from None
    if spec.regex is not None:
        try:
            re.compile(spec.regex)
        except re.error as exc:
            raise invalid(f"invalid regex {spec.regex!r}: {exc}", param) from None


def resolve_max_tokens(
    num_prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    default_max_tokens: int | None = None,
) -> int:
    """The completion budget: max_tokens if it fits in the context, else a clear error. Unset
    (None): what the context leaves, at most `default_max_tokens` (the generation config's
    `max_new_tokens`), which is never an error."""
    if num_prompt_tokens >= max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (no room for a completion).",
            "prompt",
        )
    if max_tokens is None:
        left = max_model_len - num_prompt_tokens
        return left if default_max_tokens is None else min(left, default_max_tokens)
    if num_prompt_tokens + max_tokens > max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
        )
    return max_tokens


def _require(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise invalid(message, param)
