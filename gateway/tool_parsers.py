"""Tool-call parsers: a completion's text -> (content, calls), chosen by `--tool-call-parser`.

`hermes`: Hermes / Qwen templates' `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks (the default model's family); `llama3_json`: Llama 3's JSON call
`{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`, several joined by `; `).
Text that does not parse as calls is content, never an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class ParsedTools:
    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, JSON arguments)


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> ParsedTools:
    calls = []
    for block in _HERMES.findall(text):
        call = _call(block, "arguments")
        if call is None:
            return ParsedTools(text)
        calls.append(call)
    if not calls:
        return ParsedTools(text)
    content = text[: text.index("<tool_call>")].strip()
    return ParsedTools(content or None, calls)


def parse_llama3_json(text: str) -> ParsedTools:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return ParsedTools(text)
    calls = []
    for part in body.split("; "):
        call = _call(part, "parameters") or _call(part, "arguments")
        if call is None:
            return ParsedTools(text)
        calls.append(call)
    return ParsedTools(None, calls)


def _call(text: str, arguments_key: str) -> tuple[str, str] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


TOOL_PARSERS: dict[str, Callable[[str], ParsedTools]] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
}
