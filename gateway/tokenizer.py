"""The model's tokenizer and chat template, loaded without transformers (and so without torch).

transformers imports torch as soon as its tokenizer classes load, and the gateway must not. The
model folder's `tokenizer.json` is what transformers' fast tokenizers wrap anyway, so we load it
with the `tokenizers` library, read the special tokens and chat template from
`tokenizer_config.json` / `chat_template.jinja`, and render templates in a jinja2 sandbox set up
the way transformers sets it up (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`,
`strftime_now`). `tests/gateway_tests/test_gateway_tokenizer.py` checks we agree with transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from contract.limits import DEFAULT_MAX_MODEL_LEN
from gateway.schema import ChatMessage

# What transformers' `clean_up_tokenization` replaces when a tokenizer asks for it.
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(slots=True, frozen=True)
class ModelFacts:
    """What the gateway needs to know about the model besides the tokenizer."""

    vocab_size: int  # ids >= this are out of vocabulary for the model
    max_position_embeddings: int | None
    eos_token_ids: tuple[int, ...]


class ChatTemplateError(ValueError):
    """The chat template is missing or failed to render these messages; `param` names the
    request field at fault."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class GatewayTokenizer:
    """Encode, decode and apply the chat template for one model folder."""

    def __init__(
        self, folder: str | Path, chat_template: str | None = None, model_folder=None
    ) -> None:
        """`folder`: tokenizer files and chat template; `model_folder` (default: the same):
        config.json and generation_config.json (vocabulary size, context, EOS)."""
        self.folder = Path(folder)
        self.model_folder = self.folder if model_folder is None else Path(model_folder)
        tokenizer_file = self.folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(
                f"{self.folder} has no tokenizer.json; the gateway needs a fast tokenizer file"
            )
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(self.folder / "tokenizer_config.json")
        self._special = {name: _token_text(config.get(name)) for name in _SPECIAL_NAMES}
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = _pick_template(self.folder, config, chat_template)
        self._template = _compile(self.chat_template) if self.chat_template else None
        self.facts = _model_facts(self.model_folder, self._tok, self._special["eos_token"])

    # -- sizes and special tokens -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.facts.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.facts.eos_token_ids

    def default_max_model_len(self) -> int:
        """The engine's default context: min(model's max positions, 4096)."""
        positions = self.facts.max_position_embeddings
        return DEFAULT_MAX_MODEL_LEN if positions is None else min(positions, DEFAULT_MAX_MODEL_LEN)

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, unlike encode, releases the GIL while it works: a long prompt tokenized
        # on the gateway's tokenizer thread does not stall the event loop.
        (encoding,) = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._cleanup else text

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    # -- chat -----------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: Sequence[dict] = (),
        *,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render the conversation to text (tokenize it with add_special_tokens=False).

        `continue_final_message`: end the text inside the last message, so the model goes on
        writing it (no end-of-turn marker, no new turn). `template_kwargs`: more variables for
        the template (e.g. a model's `enable_thinking`); they may not replace the ones set here.
        """
        if self._template is None:
            raise ChatTemplateError(
                "the model has no chat template; start the gateway with --chat-template"
            )
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        extra = dict(template_kwargs or {})
        taken = sorted(set(extra) & (_TEMPLATE_VARIABLES | set(self._special)))
        if taken:
            raise ChatTemplateError(
                f"chat_template_kwargs may not set {', '.join(taken)}: the server sets them",
                "chat_template_kwargs",
            )
        if tools:
            extra["tools"] = list(tools)
        plain = [_message_dict(m) for m in messages]
        try:
            text = self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                **extra,
                **self._special,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from exc
        return _cut_after_final(text, messages[-1].content) if continue_final_message else text


# Variables the gateway itself hands to the chat template.
_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools"})


def _cut_after_final(text: str, final: str) -> str:
    """The rendered chat up to the end of the final message's content, dropping whatever the
    template put after it (an end-of-turn token, a newline). Templates that trim a message's
    surrounding whitespace are handled by matching its stripped content."""
    core = final.strip()
    if not core:
        raise ChatTemplateError(
            "continue_final_message needs a final message with content", "messages"
        )
    at = text.rfind(core)
    if at < 0:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not render the final message's "
            "content verbatim, so there is no place to continue it from"
        )
    # Keep trailing whitespace of the message when the template kept it too.
    kept = final.lstrip()
    if text[at : at + len(kept)] == kept:
        return text[: at + len(kept)]
    return text[: at + len(core)]


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as transformers hands it to templates: tool-call arguments as a dict."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as strings or as AddedToken dicts with a `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(folder: Path, config: dict[str, Any], override: str | None) -> str | None:
    """--chat-template (a file or the template itself) > chat_template.jinja > tokenizer config."""
    if override is not None:
        candidate = Path(override).expanduser()
        if "{" not in override and candidate.is_file():
            return candidate.read_text(encoding="utf-8")
        if "{" not in override:
            raise ValueError(f"--chat-template {override!r} is neither a file nor a template")
        return override
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not parse: {exc}") from exc


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _clean_up(text: str) -> str:
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text


def _model_facts(folder: Path, tok: Tokenizer, eos_text: str | None) -> ModelFacts:
    config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        vocab = tok.get_vocab_size(with_added_tokens=True)
    positions = config.get("max_position_embeddings")
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids and eos_text is not None and tok.token_to_id(eos_text) is not None:
        eos_ids = [tok.token_to_id(eos_text)]
    return ModelFacts(
        vocab_size=vocab,
        max_position_embeddings=positions if isinstance(positions, int) else None,
        eos_token_ids=tuple(int(i) for i in eos_ids),
    )
