"""The offline `LLM`, as `pdserve` exports it: the engine's, with the default model resolved
(converted on first use) before the engine starts."""

from __future__ import annotations

import os

from engine.llm import LLM as EngineLLM
from pdserve.default_model import resolve_model


class LLM(EngineLLM):
    """`LLM()` serves the default model; `LLM(model=path)` any supported local HF folder."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        **engine_kwargs,
    ) -> None:
        super().__init__(str(resolve_model(model, cache_dir)), **engine_kwargs)
