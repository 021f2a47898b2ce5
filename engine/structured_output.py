"""Structured outputs with xgrammar: compiled grammars (cached), one matcher per request, and
the token bitmask of a batch.

The step, in the engine's order:
  1. `add_request` / `reserve_import` -> `StructuredOutputManager.matcher(spec)` compiles the
     grammar once per distinct spec (an LRU cache) and gives the request its own matcher;
  2. before sampling, `fill_bitmask(requests)` writes one row of allowed tokens per request
     (rows without a grammar allow everything), or returns None when no request has one;
  3. the sampler calls `apply_bitmask(logits, bitmask)`: disallowed tokens get -inf;
  4. every accepted token advances the request's matcher (`accept(request, token)`); a matcher
     that has accepted a stop token is terminated and the request stops.

Speculative decoding: `fill_verify_bitmask` gives a request's k + 1 verify rows their masks (the
matcher advanced over the proposals, then rolled back), `valid_prefix` cuts point-mass proposals
at the first token the grammar refuses, and the verifier masks through the same `apply_bitmask`;
the tokens it emits then advance the matcher one at a time as they are appended.

Disaggregated: the prefill worker's request samples its first token under the grammar; the decode
worker builds its own matcher from the same spec and replays that first token into it
(`commit_import`), which is the same matcher state the prefill worker had.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
import xgrammar as xgr

from contract.structured import StructuredOutputs

_MAX_CACHED_GRAMMARS = 256


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        # xgrammar's own cache is keyed by its inputs too; ours bounds memory and counts hits.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[StructuredOutputs, xgr.CompiledGrammar] = OrderedDict()
        self.num_compiled = 0

    def matcher(self, spec: StructuredOutputs) -> xgr.GrammarMatcher:
        """A fresh matcher for `spec`; ValueError if the grammar does not compile."""
        return xgr.GrammarMatcher(self.compiled(spec))

    def compiled(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        grammar = self._cache.get(spec)
        if grammar is not None:
            self._cache.move_to_end(spec)
            return grammar
        grammar = self._compile(spec)
        self.num_compiled += 1
        self._cache[spec] = grammar
        if len(self._cache) > _MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return grammar

    def fill_bitmask(self, matchers: list) -> torch.Tensor | None:
        """(rows, ceil(V / 32)) int32 bitmask, one row per entry (None: no constraint), or None
        when no entry has a matcher."""
        if all(m is None for m in matchers):
            return None
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # all allowed
        for row, m in enumerate(matchers):
            if m is not None and not m.is_terminated():
                m.fill_next_token_bitmask(bitmask, row)
        return bitmask

    def fill_verify_bitmask(
        self, entries: list[tuple[object | None, list[int]]]
    ) -> torch.Tensor | None:
        """Bitmask rows for speculative verification, or None when no entry has a matcher.

        Per entry (matcher, proposals): len(proposals) + 1 rows, row j the mask after the first
        j proposals. The matcher is advanced over the proposals it accepts and rolled back, so
        it ends where it started. Rows past a proposal the grammar refuses (or past the end of
        the grammar) allow everything: verification stops at that proposal, never reading them.
        """
        if all(m is None for m, _ in entries):
            return None
        bitmask = xgr.allocate_token_bitmask(sum(len(d) + 1 for _, d in entries), self.vocab_size)
        row = 0
        for m, drafts in entries:
            if m is not None:
                advanced = 0
                for j in range(len(drafts) + 1):
                    if m.is_terminated():
                        break
                    m.fill_next_token_bitmask(bitmask, row + j)
                    if j == len(drafts) or not m.accept_token(drafts[j]):
                        break
                    advanced += 1
                if advanced:
                    m.rollback(advanced)
            row += len(drafts) + 1
        return bitmask

    def _compile(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        try:
            return self._compiler.compile_grammar(_valid_utf8(_ebnf(spec)))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"invalid structured output {spec.kind}: {_first_line(exc)}") from None


def _ebnf(spec: StructuredOutputs) -> str:
    """The constraint as xgrammar EBNF (JSON: no free whitespace)."""
    kind = spec.kind
    if kind == "json":
        grammar = xgr.Grammar.from_json_schema(spec.json, any_whitespace=False)
    elif kind == "json_object":  # any object (xgrammar's built-in JSON grammar allows arrays)
        grammar = xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False
        )
    elif kind == "regex":
        grammar = xgr.Grammar.from_regex(spec.regex)
    elif kind == "choice":
        grammar = xgr.Grammar.from_ebnf(
            "root ::= " + " | ".join(json.dumps(c) for c in spec.choice)
        )
    else:
        grammar = xgr.Grammar.from_ebnf(spec.grammar)
    return str(grammar)


# xgrammar's negated character classes admit the UTF-16 surrogates U+D800..U+DFFF, which are not
# valid UTF-8 (the text decodes to U+FFFD), and its rule for the characters of a length-bounded
# JSON string admits the control characters U+0000..U+001F, which JSON forbids unescaped: either
# makes an output a JSON parser refuses. Both found by tests/gateway_tests/test_structured_outputs.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _valid_utf8(ebnf: str) -> str:
    """Patch the character classes of xgrammar's printed EBNF (never inside string literals)."""
    out: list[str] = []
    i, in_string = 0, False
    while i < len(ebnf):
        c = ebnf[i]
        if c == "\\":  # an escape, in a literal or a class: copy it whole
            out.append(ebnf[i : i + 2])
            i += 2
            continue
        if c == '"':
            in_string = not in_string
        elif c == "[" and not in_string:
            end = _class_end(ebnf, i)
            out.append(_patch_class(ebnf[i : end + 1]))
            i = end + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _class_end(ebnf: str, start: int) -> int:
    i = start + 1
    while ebnf[i] != "]":
        i += 2 if ebnf[i] == "\\" else 1
    return i


def _patch_class(cls: str) -> str:
    if cls == _BOUNDED_STRING_CHAR:
        cls = _JSON_STRING_CHAR
    return r"[^\uD800-\uDFFF" + cls[2:] if cls.startswith("[^") else cls


def valid_prefix(matcher, tokens: list[int]) -> int:
    """How many leading `tokens` the grammar allows in a row (the matcher ends where it began)."""
    n = 0
    for token in tokens:
        if matcher.is_terminated() or not matcher.accept_token(token):
            break
        n += 1
    if n:
        matcher.rollback(n)
    return n


def accept(matcher, token: int) -> bool:
    """Advance a request's matcher by its newest token (a terminated matcher accepts nothing)."""
    return matcher is None or (not matcher.is_terminated() and matcher.accept_token(token))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: tokens a row's bitmask disallows get -inf. logits (rows, >= V) float on any
    device; bitmask (rows, ceil(V / 32)) int32 from `fill_bitmask` (moved to the logits' device)."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # xgrammar prefixes "[time] /path/file.cc:line: "; keep only the message.
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
