"""Tool calling for the chat route: what `tools` / `tool_choice` ask for, and the calls in a
completion's text.

- `none`: the tools reach the chat template, the text is plain content;
- `required` / a named function: enforced through structured outputs (a JSON schema of the
  declared functions' calls, or of the named function's parameters), so the output is always a
  valid call to a declared function;
- `auto`: the model decides; its text is parsed by `--tool-call-parser` (needs
  `--enable-auto-tool-choice`, as in vLLM).
A choice that ends with calls has `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contract.structured import StructuredOutputs
from gateway.errors import invalid
from gateway.tool_parsers import TOOL_PARSERS, ParsedTools

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(slots=True, frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: tuple[dict[str, Any], ...] = ()
    name: str | None = None  # the named function
    parallel: bool = True
    parser: Callable[[str], ParsedTools] | None = None  # auto

    @property
    def parses(self) -> bool:
        """Whether the completion's text is turned into tool calls."""
        return self.mode in ("required", "named") or (self.mode == "auto" and bool(self.tools))

    def constraint(self) -> StructuredOutputs | None:
        if self.mode == "named":
            return StructuredOutputs(json=json.dumps(_parameters(self._tool(self.name))))
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"enum": [t["function"]["name"]]},
                        "parameters": _parameters(t),
                    },
                    "required": ["name", "parameters"],
                }
                for t in self.tools
            ]
            schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputs(json=json.dumps(schema))
        return None

    def parse(self, text: str) -> ParsedTools:
        if self.mode == "named":
            return ParsedTools(None, [(self.name, _normalized(text))])  # type: ignore[list-item]
        if self.mode == "required":
            try:
                calls = json.loads(text)
                return ParsedTools(None, [(c["name"], json.dumps(c["parameters"])) for c in calls])
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens
                return ParsedTools(text)
        assert self.parser is not None
        return self.parser(text)

    def _tool(self, name: str | None) -> dict[str, Any]:
        return next(t for t in self.tools if t["function"]["name"] == name)


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel: bool | None,
    parser_name: str | None,
    auto_enabled: bool,
) -> ToolPlan:
    """The plan, or a 400 naming `tools` / `tool_choice`."""
    tools = tools or []
    for t in tools:
        if t.get("type", "function") != "function" or "name" not in t.get("function", {}):
            raise invalid("only tools of type function, with a name, are supported", "tools")
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    parallel = True if parallel is None else parallel
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type", "function") != "function" or name not in names:
            raise invalid(f"tool_choice names a function not in tools: {name!r}", "tool_choice")
        return ToolPlan("named", tuple(tools), name, parallel)
    if tool_choice == "none":
        return ToolPlan("none", tuple(tools))
    if tool_choice == "required":
        if not tools:
            raise invalid('tool_choice "required" needs tools', "tool_choice")
        return ToolPlan("required", tuple(tools), None, parallel)
    if tool_choice == "auto":
        if tools and not (auto_enabled and parser_name):
            raise invalid(
                '"auto" tool choice requires the server to run with --enable-auto-tool-choice '
                "and --tool-call-parser",
                "tool_choice",
            )
        parser = TOOL_PARSERS[parser_name] if parser_name else None
        return ToolPlan("auto", tuple(tools), None, parallel, parser)
    raise invalid(
        f"tool_choice must be none, auto, required or a function, got {tool_choice!r}",
        "tool_choice",
    )


def call_objects(parsed: ParsedTools, index_base: int = 0) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` entries (each with a fresh id)."""
    return [
        {
            "index": index_base + i,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        for i, (name, arguments) in enumerate(parsed.calls)
    ]


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or _EMPTY_PARAMETERS


def _normalized(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text
