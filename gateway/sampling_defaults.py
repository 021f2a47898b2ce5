"""What a request's unset sampling fields become, for both front doors (OpenAI routes, gRPC).

A field the request sets wins; an unset one takes the generation config's default (vLLM's
`--generation-config`, `contract/generation_config.py`), else the contract's. For the fields a
generation config can default, `None` counts as unset, as in vLLM.

`max_tokens` is the one the core finishes: a request that leaves it unset while the generation
config has `max_new_tokens` gets `max_tokens=None` here, and `GatewayCore.open` resolves it to
what the context leaves, at most `max_new_tokens` (as vLLM: a default never makes a request fail
for its length; a `max_tokens` the request sets and the context cannot hold does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from contract import generation_config
from contract.sampling import field as sampling_field
from gateway.errors import GatewayError
from gateway.schema import GenerationParams
from gateway.validation import Limits, validate_params

CONTRACT_MAX_TOKENS = sampling_field("max_tokens").default  # 16


@dataclass(slots=True, frozen=True)
class SamplingDefaults:
    # sampling field -> default from generation_config.json (fields of
    # `generation_config.DEFAULTABLE` only); empty: the contract's defaults
    values: Mapping[str, int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.values) - generation_config.DEFAULTABLE
        if unknown:
            raise ValueError(f"fields a generation config cannot default: {sorted(unknown)}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    @classmethod
    def load(cls, setting: str, model_folder: Path, limits: Limits) -> SamplingDefaults:
        """Read and check the defaults at start-up: a bad file or value is a ValueError."""
        values = generation_config.load_sampling_defaults(setting, model_folder)
        try:
            validate_params(GenerationParams(**values), limits)
        except GatewayError as exc:
            raise ValueError(
                f"generation config {setting!r} ({model_folder}): {exc.message}"
            ) from None
        return cls(values)

    @property
    def max_tokens(self) -> int | None:
        """The generation config's `max_new_tokens`: the cap of an unset `max_tokens`."""
        value = self.values.get("max_tokens")
        return None if value is None else int(value)

    def params(
        self, given: Mapping[str, Any], max_tokens_fallback: int | None = CONTRACT_MAX_TOKENS
    ) -> GenerationParams:
        """GenerationParams from the fields a request gave. `max_tokens_fallback`: what an unset
        `max_tokens` is when the generation config has none (the route's own default: 16 for
        completions and gRPC, None -- up to the context -- for chat)."""
        values = {
            name: value
            for name, value in given.items()
            if value is not None or name not in generation_config.DEFAULTABLE
        }
        for name, value in self.values.items():
            values.setdefault(name, None if name == "max_tokens" else value)
        values.setdefault("max_tokens", max_tokens_fallback)
        return GenerationParams(**values)


NO_DEFAULTS = SamplingDefaults()  # the contract's defaults only (`--generation-config vllm`)
