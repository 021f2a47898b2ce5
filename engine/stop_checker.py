"""Decides whether a request stops after its newest token, and why."""

from __future__ import annotations

from dataclasses import dataclass

from contract.text import TextStream
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
        if request.matcher is not None and request.matcher.is_terminated():
            return Stop("stop", None if token in self.eos_token_ids else token)
        # A stop token ends the request before its text reaches the stop strings (as vLLM:
        # the token's text is not part of the output unless include_stop_str_in_output).
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                return Stop("stop", token)
            if not p.ignore_eos and token in self.eos_token_ids:
                return Stop("stop", None)
        if p.stop:
            hit = self._stop_string(request, token)
            if hit is not None:
                return Stop("stop", hit)
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return Stop("length")
        if request.num_tokens >= self.max_model_len:
            return Stop("length")
        return None

    def _stop_string(self, request: Request, token: int) -> str | None:
        """Feeds the request's text stream (the gateway's matcher, `contract.text`)."""
        if request.text is None:
            p = request.params
            request.text = TextStream(
                self.tokenizer,
                request.prompt_token_ids,
                p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output,
                skip_special_tokens=p.skip_special_tokens,
                min_tokens=p.min_tokens,
            )
        request.text.add(token)
        return request.text.matched
