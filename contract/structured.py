"""Structured outputs: the one constraint a request's completion must follow.

vLLM's `StructuredOutputsParams`, reduced to what travels: exactly one of a JSON schema (as JSON
text), a regular expression, a list of choices, an EBNF grammar, or "any JSON object". The gateway
checks what it can without a tokenizer (the schema is a schema, the regex compiles); the engine
compiles it with xgrammar against its vocabulary and refuses what xgrammar cannot compile.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    json: str | None = None  # a JSON schema, serialized (a dict is serialized on construction)
    regex: str | None = None
    choice: tuple[str, ...] = ()
    grammar: str | None = None  # EBNF in xgrammar's (GBNF-like) dialect, root rule `root`
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # vLLM accepts the schema as a dict too
            object.__setattr__(self, "json", _json.dumps(self.json, sort_keys=True))
        if not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """Which constraint is set; ValueError unless exactly one is."""
        kinds = [k for k in ("json", "regex", "grammar") if getattr(self, k) is not None]
        kinds += ["choice"] if self.choice else []
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, regex, choice, grammar and "
                f"json_object, got {kinds or 'none'}"
            )
        return kinds[0]

    def check(self) -> None:
        """Raise ValueError on what is wrong without compiling (compiling is the engine's)."""
        kind = self.kind
        if kind == "json":
            try:
                schema = _json.loads(self.json)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema must be an object or a boolean")
        if kind == "choice" and not all(isinstance(c, str) and c for c in self.choice):
            raise ValueError("choices must be non-empty strings")
        for text in (self.regex, self.grammar):
            if text is not None and not text.strip():
                raise ValueError(f"the {kind} must not be empty")
