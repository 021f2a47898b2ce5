"""The sampling contract: every per-request generation field, declared once.

Each layer that carries these fields -- the OpenAI routes, the gateway's gRPC front door and its
`GenerationParams`, the worker protocol (`pdserve.v1.SamplingParams`), the engine's
`SamplingParams` and the typed client's `GenerationOptions` -- either derives its field list from
`SAMPLING_FIELDS` or is checked against it by tests/contract/test_sampling_contract.py, which sends
every field's `example` through that layer and fails when it is dropped.

Adding a field: declare it here, then follow the failing tests (protos, the layers' dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.limits import (
    FLOAT32_MAX,
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    MAX_LOGPROBS,
    UINT32_MAX,
)
from contract.structured import StructuredOutputs

FLOAT32 = (-FLOAT32_MAX, FLOAT32_MAX)
INT32 = (INT32_MIN, INT32_MAX)
UINT32 = (0, UINT32_MAX)
INT64 = (INT64_MIN, INT64_MAX)


@dataclass(frozen=True, slots=True)
class SamplingField:
    name: str  # vLLM's name
    default: object  # what an unset field means
    example: object  # a valid value other than the default (the contract tests send it)
    to_worker: bool  # carried to the workers; False: the gateway applies it itself
    invalid: object = None  # a value every validating layer refuses (None: no such value)
    # The range the worker protocol and the engine can carry (inclusive; each element of a
    # list field): checked before anything is sent to a worker. None: not a number, or kept
    # at the gateway.
    carries: tuple[int | float, int | float] | None = None


SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_tokens", 16, 7, True, 0, UINT32),  # None: up to the context length
    SamplingField("temperature", 1.0, 0.5, True, -1.0, FLOAT32),  # 0: greedy
    SamplingField("top_p", 1.0, 0.75, True, 0.0, FLOAT32),
    SamplingField("top_k", 0, 5, True, -2, INT32),  # <= 0: disabled (vLLM's -1 too)
    SamplingField("min_p", 0.0, 0.25, True, 1.5, FLOAT32),
    SamplingField("presence_penalty", 0.0, 0.5, True, 2.5, FLOAT32),
    SamplingField("frequency_penalty", 0.0, -0.5, True, -2.5, FLOAT32),
    SamplingField("repetition_penalty", 1.0, 1.5, True, 0.0, FLOAT32),
    # with n > 1, choice i samples with seed + i
    SamplingField("seed", None, 1234, True, carries=INT64),
    SamplingField("stop", (), ("\n\n",), False, ("",)),  # matched on the detokenized text
    SamplingField("stop_token_ids", (), (2, 3), True, (-1,), UINT32),
    SamplingField("include_stop_str_in_output", False, True, False),
    SamplingField("ignore_eos", False, True, True),
    SamplingField("min_tokens", 0, 2, True, -1, UINT32),
    SamplingField(
        "logprobs", None, 3, True, MAX_LOGPROBS + 1, UINT32
    ),  # top-N per token; 0: only the sampled one's
    SamplingField("skip_special_tokens", True, False, False),  # detokenization
    SamplingField("n", 1, 2, False, 0),  # the gateway runs n choices
    SamplingField(  # compiled by the engine (xgrammar); the prefill and decode workers both get it
        "structured_outputs",
        None,
        StructuredOutputs(regex="[ab]{1,4}"),
        True,
        StructuredOutputs(regex="a", json_object=True),
    ),
    # top-N per prompt token (0: only the prompt token's), computed where the prompt runs: the
    # prefill worker, or a decode worker prefilling locally
    SamplingField("prompt_logprobs", None, 2, True, MAX_LOGPROBS + 1, UINT32),
    # Token edits before the draw: only these tokens (empty: all), and a bias added to the
    # logits (vLLM clamps each to [-100, 100]; the gateway takes OpenAI's string keys).
    SamplingField("allowed_token_ids", (), (2, 3, 5), True, (-1,), UINT32),
    SamplingField("logit_bias", {}, {2: 1.5, 3: -100.0}, True, {-1: 1.0}),
    # Words never generated: the engine tokenizes each (as is and after a space) and bans a
    # sequence's last token whenever the output ends with the rest of it (vLLM's rule).
    SamplingField("bad_words", (), ("hello world",), True, ("",)),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in SAMPLING_FIELDS)
WORKER_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in SAMPLING_FIELDS if f.to_worker)
# Fields a layer may have beyond the contract, each with the reason.
GATEWAY_ONLY: dict[str, str] = {}


def field(name: str) -> SamplingField:
    for f in SAMPLING_FIELDS:
        if f.name == name:
            return f
    raise KeyError(name)
