"""One choice's output: worker tokens in, text deltas out (detokenized, stop strings applied)."""

from __future__ import annotations

from collections.abc import Sequence

from contract.text import Decoder, TextStream
from gateway.schema import ChoiceDelta, FinishReason, GenerationParams, TokenLogprob


class ChoiceOutput:
    """Feeds one choice's tokens through the detokenizer and the stop-string matcher.

    Tokens after the one that completes a stop string are dropped: the worker is aborted then,
    but may already have sent more.
    """

    def __init__(
        self, index: int, tokenizer: Decoder, prompt_ids: Sequence[int], params: GenerationParams
    ) -> None:
        self.index = index
        self._text = TextStream(
            tokenizer,
            prompt_ids,
            params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            min_tokens=params.min_tokens,
        )
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._include_stop = params.include_stop_str_in_output
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def on_chunk(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[TokenLogprob] | None,
        finish_reason: FinishReason | None,
    ) -> ChoiceDelta:
        """A worker chunk: new tokens and, on the last chunk, the worker's finish reason."""
        if self.finished:
            return ChoiceDelta(self.index, [], "")
        # A worker's "stop" ends on a stop token (EOS or stop_token_ids; stop strings are matched
        # here): its text is dropped unless include_stop_str_in_output (vLLM's detokenizer).
        stop_token = None
        if finish_reason == "stop" and token_ids and not self._include_stop:
            token_ids, stop_token = token_ids[:-1], token_ids[-1]
        taken, text = self._take_tokens(token_ids)
        if stop_token is not None and self._text.matched is None:
            taken.append(stop_token)
            self.token_ids.append(stop_token)
        delta = ChoiceDelta(self.index, taken, text)
        if logprobs is not None:
            delta.logprobs = list(logprobs[: len(taken)])
        if self._text.matched is not None:
            delta.finish_reason, delta.stop_reason = "stop", self._text.matched
        elif finish_reason is not None:
            delta.text += self._text.flush()
            delta.finish_reason = "stop" if self._text.matched is not None else finish_reason
            delta.stop_reason = self._stop_reason(finish_reason)
        self.finish_reason = delta.finish_reason
        return delta

    def abort(self) -> ChoiceDelta:
        """The choice ends early (cancelled): nothing more is sent after this delta."""
        self.finish_reason = "abort"
        return ChoiceDelta(self.index, [], "", finish_reason="abort")

    def _take_tokens(self, token_ids: Sequence[int]) -> tuple[list[int], str]:
        taken: list[int] = []
        pieces: list[str] = []
        for token_id in token_ids:
            taken.append(token_id)
            pieces.append(self._text.add(token_id))
            if self._text.matched is not None:
                break
        self.token_ids.extend(taken)
        return taken, "".join(pieces)

    def _stop_reason(self, finish_reason: FinishReason) -> str | int | None:
        if self._text.matched is not None:
            return self._text.matched
        last = self.token_ids[-1] if self.token_ids else None
        if finish_reason == "stop" and last in self._stop_token_ids:
            return last
        return None
