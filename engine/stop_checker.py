"""Decides whether a request stops after its newest token, and why."""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import Request


@dataclass(slots=True)
class Stop:
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check(self, request: Request) -> Stop | None:
        p = request.params
        token = request.all_token_ids[-1]
        n_out = request.num_output_tokens
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                return Stop("stop", token)
            if not p.ignore_eos and token in self.eos_token_ids:
                return Stop("stop", None)
            if p.stop:
                hit = self._stop_string(request)
                if hit is not None:
                    return Stop("stop", hit)
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return Stop("length")
        if request.num_tokens >= self.max_model_len:
            return Stop("length")
        return None

    def _stop_string(self, request: Request) -> str | None:
        # Only the tail can hold a new match: enough tokens to cover the longest stop string.
        longest = max(len(s) for s in request.params.stop)
        tail = request.output_token_ids[-(longest + 4) :]
        text = self.tokenizer.decode(tail, skip_special_tokens=request.params.skip_special_tokens)
        for s in request.params.stop:
            if s in text:
                return s
        return None
