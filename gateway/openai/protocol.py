"""Request bodies of the OpenAI routes (pydantic), and their translation to core parameters.

A field a model does not declare is refused unless it cannot change the output
(`gateway/openai/fields.py` holds the policy and its lists).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from contract.limits import MAX_LOGPROBS
from contract.structured import StructuredOutputs
from gateway.errors import invalid
from gateway.openai.fields import refuse_unsupported
from gateway.sampling_defaults import CONTRACT_MAX_TOKENS, NO_DEFAULTS, SamplingDefaults
from gateway.schema import ChatMessage, ChatPrompt, GenerationParams, ToolCall
from gateway.validation import check_structured_outputs


class _Body(BaseModel):
    """Undeclared fields are kept (`model_extra`) so that `refuse_unsupported` can judge them."""

    model_config = ConfigDict(extra="allow")

    def refuse_unsupported(self, prefix: str = "") -> None:
        refuse_unsupported(self.model_extra, prefix)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # usage so far in every chunk


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # pdserve always enforces the schema


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def spec(self) -> StructuredOutputs | None:
        self.refuse_unsupported("response_format.")
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise invalid(
                "response_format of type json_schema needs json_schema.schema",
                "response_format",
            )
        self.json_schema.refuse_unsupported("response_format.json_schema.")
        return StructuredOutputs(json=json.dumps(self.json_schema.schema_, sort_keys=True))


class StructuredOutputsBody(_Body):
    """vLLM's `structured_outputs` object."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None

    def spec(self) -> StructuredOutputs:
        self.refuse_unsupported("structured_outputs.")
        return _spec(self.json_, self.regex, self.choice, self.grammar, bool(self.json_object))


def _spec(json_, regex, choice, grammar, json_object: bool) -> StructuredOutputs:
    if json_ is not None and not isinstance(json_, str):
        json_ = json.dumps(json_, sort_keys=True)
    return StructuredOutputs(json_, regex, tuple(choice or ()), grammar, json_object)


class _SamplingRequest(_Body):
    """Fields shared by completions and chat (OpenAI's plus vLLM's extensions)."""

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
    allowed_token_ids: list[int] | None = None  # non-empty: only these tokens may be sampled
    bad_words: list[str] | None = None  # never generated
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    return_tokens_as_token_ids: StrictBool = False  # logprobs name tokens `token_id:N`
    prompt_logprobs: int | None = None  # top-N per prompt token (0: the prompt token's alone)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens (-1: the context)
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs, vLLM's older names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def structured(self) -> StructuredOutputs | None:
        """The one structured-output constraint the request sets, checked (400 names its field)."""
        specs: list[tuple[str, StructuredOutputs]] = []
        if self.response_format is not None:
            spec = self.response_format.spec()
            if spec is not None:
                specs.append(("response_format", spec))
        if self.structured_outputs is not None:
            specs.append(("structured_outputs", self.structured_outputs.spec()))
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            value = getattr(self, name)
            if value is not None:
                kind = name.removeprefix("guided_")
                args = {k: None for k in ("json_", "regex", "choice", "grammar")}
                args["json_" if kind == "json" else kind] = value
                specs.append((name, _spec(json_object=False, **args)))
        if len(specs) > 1:
            names = ", ".join(name for name, _ in specs)
            raise invalid(f"set at most one structured-output field, got {names}", specs[1][0])
        if not specs:
            return None
        param, spec = specs[0]
        check_structured_outputs(spec, param)
        return spec

    def _params(
        self,
        defaults: SamplingDefaults,
        max_tokens: int | None,
        max_tokens_fallback: int | None,
        logprobs: int | None,
    ) -> GenerationParams:
        """Unset (None) fields take `defaults` (the generation config's, else the contract's);
        `max_tokens_fallback`: an unset max_tokens when the generation config has none."""
        self.refuse_unsupported()
        if self.stream_options is not None:
            self.stream_options.refuse_unsupported("stream_options.")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        given = dict(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=_stop_list(self.stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            n=self.n,
            structured_outputs=self.structured(),
            prompt_logprobs=self.prompt_logprobs,
            allowed_token_ids=tuple(self.allowed_token_ids or ()),
            bad_words=tuple(self.bad_words or ()),
            logit_bias=_logit_bias(self.logit_bias),
        )
        return defaults.params(given, max_tokens_fallback)


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = None  # absent: 16 (OpenAI's); null: up to the context
    logprobs: int | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: StrictBool = True  # vLLM: BOS etc. added when tokenizing the prompt

    def to_params(self, defaults: SamplingDefaults = NO_DEFAULTS) -> GenerationParams:
        if self.suffix:
            raise invalid("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of is not supported (it must be unset or equal to n)", "best_of")
        # The generation config's max_new_tokens, if any, replaces both fallbacks (vLLM keeps
        # 16 for an absent max_tokens; we take the model's default, as for every other field).
        fallback = None if "max_tokens" in self.model_fields_set else CONTRACT_MAX_TOKENS
        params = self._params(defaults, self.max_tokens, fallback, self.logprobs)
        if self.echo_logprobs and params.prompt_logprobs is None:
            # As vLLM: the echoed prompt's logprobs are its prompt logprobs, top-N as `logprobs`.
            params = replace(params, prompt_logprobs=self.logprobs)
        return params

    @property
    def echo_logprobs(self) -> bool:
        """echo with logprobs: the logprobs cover the prompt's tokens, then the completion's."""
        return self.echo and self.logprobs is not None


class ContentPart(_Body):
    type: str
    text: str | None = None

    def to_text(self) -> str:
        if self.type != "text":
            raise invalid(
                f"content parts of type {self.type!r} are not supported: this model takes "
                "text only (image, audio and file inputs are not supported by this model)",
                "messages",
            )
        if self.text is None:
            raise invalid("a text content part needs `text`", "messages")
        self.refuse_unsupported("messages.content.")
        return self.text


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallBody(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_tool_call(self) -> ToolCall:
        self.refuse_unsupported("messages.tool_calls.")
        return ToolCall(self.id, self.function.name, self.function.arguments)


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def to_chat_message(self) -> ChatMessage:
        self.refuse_unsupported("messages.")
        if isinstance(self.content, list):
            content = "".join(part.to_text() for part in self.content)
        else:
            content = self.content or ""
        calls = tuple(c.to_tool_call() for c in self.tool_calls or ())
        return ChatMessage(self.role, content, self.name, self.tool_call_id, calls)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM accepts a Jinja template per request (behind a trust flag); rendering a client's
    # template is running a client's code, so it is refused, not silently ignored.
    chat_template: str | None = None

    def to_params(
        self,
        tool_constraint: StructuredOutputs | None = None,
        max_logprobs: int = MAX_LOGPROBS,
        defaults: SamplingDefaults = NO_DEFAULTS,
    ) -> GenerationParams:
        """`tool_constraint`: what tool_choice required / a named function enforces;
        `max_logprobs`: the server's cap on top_logprobs (--max-logprobs); `defaults`: what
        unset sampling fields become (--generation-config)."""
        if self.chat_template is not None:
            raise invalid(
                "a chat template in the request is not accepted: prompts are rendered with the "
                "server's template (set with pdserve gateway --chat-template)",
                "chat_template",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= max_logprobs:
            raise invalid(
                f"top_logprobs must be in [0, {max_logprobs}], got {self.top_logprobs}",
                "top_logprobs",
            )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        params = self._params(defaults, max_tokens, None, logprobs)  # unset: up to the context
        if tool_constraint is None:
            return params
        if params.structured_outputs is not None:
            raise invalid(
                "tool_choice required or a named function cannot be combined with a "
                "structured-output field",
                "tool_choice",
            )
        return replace(params, structured_outputs=tool_constraint)

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(m.to_chat_message() for m in self.messages)

    def chat_prompt(self, tools: Sequence[dict] = ()) -> ChatPrompt:
        return chat_prompt(self, self.chat_messages(), tools)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # no output to change
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None


def chat_prompt(
    body: ChatCompletionRequest | TokenizeRequest,
    messages: tuple[ChatMessage, ...],
    tools: Sequence[dict] = (),
) -> ChatPrompt:
    """The prompt a chat request renders: vLLM's rule that a continued final message gets no
    generation prompt is checked here, naming the field."""
    if body.continue_final_message and body.add_generation_prompt:
        raise invalid(
            "continue_final_message and add_generation_prompt cannot both be true "
            "(set add_generation_prompt to false to continue the last message)",
            "continue_final_message",
        )
    return ChatPrompt(
        messages,
        body.add_generation_prompt,
        tuple(tools),
        body.continue_final_message,
        tuple((body.chat_template_kwargs or {}).items()),
    )


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
