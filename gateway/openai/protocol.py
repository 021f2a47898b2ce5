"""Request bodies of the OpenAI routes (pydantic), and their translation to core parameters.

Unknown fields are ignored, as OpenAI clients send fields a server may not know.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.errors import invalid
from gateway.schema import ChatMessage, GenerationParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat (OpenAI's plus vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, ignored
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int | None, logprobs: int | None) -> GenerationParams:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=_stop_list(self.stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            n=self.n,
            logit_bias=_logit_bias(self.logit_bias),
        )


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_params(self) -> GenerationParams:
        if self.suffix:
            raise invalid("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of is not supported (it must be unset or equal to n)", "best_of")
        if self.echo and self.logprobs is not None:
            raise invalid("echo with logprobs is not supported (no prompt logprobs)", "echo")
        return self._params(self.max_tokens, self.logprobs)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_chat_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            return ChatMessage(self.role, "".join(part.text for part in self.content))
        return ChatMessage(self.role, self.content or "")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = None
    add_generation_prompt: StrictBool = True
    # vLLM accepts a Jinja template per request (behind a trust flag); rendering a client's
    # template is running a client's code, so it is refused, not silently ignored.
    chat_template: str | None = None

    def to_params(self) -> GenerationParams:
        if self.chat_template is not None:
            raise invalid(
                "a chat template in the request is not accepted: prompts are rendered with the "
                "server's template (set with pdserve gateway --chat-template)",
                "chat_template",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return self._params(max_tokens, logprobs)

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(m.to_chat_message() for m in self.messages)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out
