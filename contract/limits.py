"""Limits that more than one layer enforces (the gateway refuses early what the engine would)."""

from __future__ import annotations

MAX_LOGPROBS = 20  # top-N logprobs per sampled token, at most
DEFAULT_MAX_MODEL_LEN = 4096  # without --max-model-len: min(model's max positions, this)
