"""Which request fields the OpenAI routes honour, ignore or refuse.

The rule: nothing that would change the output is silently ignored. A field is either

- declared on the request model and honoured;
- harmless metadata (`IGNORED`): accepted and dropped, since it cannot change the completion;
- at a value that asks for nothing (`null`, or its no-op value in `NO_OP`): accepted;
- anything else -- a vLLM or OpenAI field pdserve does not implement, or a name it does not
  know -- a 400 whose `param` names the field.

docs/api.md lists every field of each route with its treatment;
tests/gateway_tests/test_openai_fields.py walks vLLM's documented fields against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import invalid

# Metadata that cannot change a completion.
IGNORED: dict[str, str] = {
    "user": "an end-user id for abuse tracking",
    "metadata": "OpenAI's stored-completion tags",
    "store": "OpenAI's stored completions",
    "service_tier": "OpenAI's billing tier",
    "priority": "vLLM's scheduling priority (pdserve schedules first come, first served)",
    "request_id": "vLLM's request id (pdserve makes its own, returned as `id`)",
    "cache_salt": "vLLM's prefix-cache salt (isolation only, never the output)",
    "cache_prompt": "llama.cpp's prompt-cache hint (pdserve's benchmarks send it to both servers)",
    "guided_decoding_backend": "vLLM's backend choice (pdserve always uses xgrammar)",
    "disable_fallback": "vLLM's structured-output backend fallback (there is none to fall to)",
    "disable_any_whitespace": "pdserve's JSON grammars already allow no free whitespace",
    "prediction": "OpenAI's predicted outputs (a latency hint)",
    "modalities": "OpenAI's output modalities (text is the only one)",
}

# Fields pdserve does not implement, accepted at the value that asks for nothing.
NO_OP: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "spaces_between_special_tokens": True,
    "include_reasoning": True,
    "echo": False,  # chat: vLLM's "prepend the last message"
    "add_special_tokens": False,  # chat: the template adds what the model needs
    "documents": [],
    "mm_processor_kwargs": {},
    "functions": [],
    "logits_processors": [],
    "vllm_xargs": {},
    "kv_transfer_params": {},
    "continuous_usage_stats": False,
    "disable_additional_properties": False,
}


def refuse_unsupported(extra: Mapping[str, Any] | None, prefix: str = "") -> None:
    """Raise a 400 naming the first field of `extra` (the fields a request model did not
    declare) that is neither ignorable metadata nor at a value that asks for nothing."""
    for name, value in (extra or {}).items():
        if name in IGNORED or value is None:
            continue
        if name in NO_OP and value == NO_OP[name]:
            continue
        param = f"{prefix}{name}"
        raise invalid(f"`{param}` is not supported by this server", param)
