"""Typed requests and outputs of the gateway core (no protobuf, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.finish import FinishReason as FinishReason  # the gateway names it from here
from contract.structured import StructuredOutputs


@dataclass(slots=True, frozen=True)
class GenerationParams:
    """Per-request generation parameters, vLLM field names and defaults."""

    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # with n > 1, choice i samples with seed + i
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-N per token; 0: only the sampled token's logprob
    skip_special_tokens: bool = True
    n: int = 1
    structured_outputs: StructuredOutputs | None = None  # checked here, compiled by the engine
    prompt_logprobs: int | None = None  # top-N per prompt token; 0: only the prompt token's
    allowed_token_ids: tuple[int, ...] = ()  # non-empty: only these tokens may be sampled
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits
    bad_words: tuple[str, ...] = ()  # words the output never contains


@dataclass(slots=True, frozen=True)
class TextPrompt:
    text: str
    add_special_tokens: bool = True


@dataclass(slots=True, frozen=True)
class TokenPrompt:
    token_ids: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A function call an assistant made: `arguments` is the JSON text of the arguments."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True, frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None  # a "tool" message: the call it answers
    tool_calls: tuple[ToolCall, ...] = ()  # an "assistant" message's calls


@dataclass(slots=True, frozen=True)
class ChatPrompt:
    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = True
    tools: tuple[dict, ...] = ()  # OpenAI tool objects, handed to the chat template
    continue_final_message: bool = False  # the model goes on writing the last message
    template_kwargs: tuple[tuple[str, Any], ...] = ()  # more chat-template variables


Prompt = TextPrompt | TokenPrompt | ChatPrompt


@dataclass(slots=True, frozen=True)
class GenerateRequest:
    prompt: Prompt
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str | None = None  # None: the gateway makes one
    timeout_s: float | None = None  # the client's deadline, if it set one
    truncate_prompt_tokens: int | None = None  # keep the last N prompt tokens (-1: the context)


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """Logprob of one token (sampled, or a prompt token given those before it) plus the top-N
    alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # the token's 1-based rank, where the worker sent it


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice gained: new tokens, the text they complete, and maybe its end."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # With params.prompt_logprobs, on the choice's first delta: prompt tokens 1.. (not the first).
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
