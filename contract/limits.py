"""Limits that more than one layer enforces (the gateway refuses early what the engine would)."""

from __future__ import annotations

MAX_LOGPROBS = 20  # top-N logprobs per sampled (or prompt) token, at most
DEFAULT_MAX_MODEL_LEN = 4096  # without --max-model-len: min(model's max positions, this)

# What the worker protocol's scalar types carry (protos/pdserve/v1/common.proto).
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # a larger finite double becomes inf as a float32
