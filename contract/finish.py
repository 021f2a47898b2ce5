"""Why a sequence stopped, as every layer names it."""

from __future__ import annotations

from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
# "stop": EOS, a stop token id or a stop string; "length": max_tokens or the context length;
# "abort": cancelled (client gone, deadline, error). The engine's prefill-only requests end
# with "prefill", which never leaves the prefill worker.
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort")
