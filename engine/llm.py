"""The offline API, shaped like vLLM's `LLM`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from tqdm.auto import tqdm

from contract.generation_config import AUTO, describe, load_sampling_defaults
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import (
    CompletionOutput,
    LLMOutput,
    Logprob,
    PositionLogprobs,
    RequestOutput,
    TokenLogprob,
)
from engine.sampling_params import SamplingParams

PromptType = str | dict
log = logging.getLogger(__name__)


class LLM:
    """`LLM(model)`: `model` is any supported local HF folder (`pdserve.LLM()` resolves the
    default model first).

    `generation_config`, as vLLM's: "auto" (default) takes the sampling defaults (temperature,
    top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens) from the model
    folder's generation_config.json, "vllm" ignores the file, a folder reads its file. They are
    `get_default_sampling_params()`, which `generate` and `chat` use without `sampling_params`.
    """

    def __init__(self, model: str, generation_config: str = AUTO, **engine_kwargs) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_kwargs) - known
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(known)}")
        config = EngineConfig(model=model, **engine_kwargs)
        self._default_params = _default_sampling_params(str(generation_config), model)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0
        self._token_texts: dict[int, str] = {}  # Logprob.decoded_token, decoded once per id

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[LLMOutput]:
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _per_prompt(sampling_params, len(items))
        encoded = [self._encode(p) for p in items]
        for _, ids in encoded:
            self.engine.check_prompt(ids)  # every prompt is checked before any is queued
        results = [LLMOutput(str(i), text, ids) for i, (text, ids) in enumerate(encoded)]
        children = self._add_all(encoded, params, results)
        self._run(children, len(children), use_tqdm)
        return results

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the generation config's defaults (a new object each call, to
        change as you like), as vLLM's `LLM.get_default_sampling_params`."""
        return self._default_params.clone()

    def get_tokenizer(self):
        """The tokenizer the engine encodes and decodes with (as vLLM's `LLM.get_tokenizer`)."""
        return self.tokenizer

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache, e.g. between benchmark runs over the same prompts."""
        self.engine.reset_prefix_cache()

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[LLMOutput]:
        """Render each conversation with the model's chat template (as vLLM's `LLM.chat`):
        `continue_final_message` ends the prompt inside the last message so the model goes on
        writing it (it needs `add_generation_prompt=False`); `tools` and
        `chat_template_kwargs` reach the template."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        kwargs = dict(chat_template_kwargs or {})
        taken = sorted(set(kwargs) & {"conversation", "messages", "tools", "add_generation_prompt",
                                      "continue_final_message", "tokenize", "chat_template"})  # fmt: skip
        if taken:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            ids = self.tokenizer.apply_chat_template(
                conv,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                tokenize=True,
                return_dict=False,
                **kwargs,
            )
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    # -- internals --------------------------------------------------------------------------

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(
            f"a prompt is a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}"
        )

    def _add_all(
        self, encoded, params, results
    ) -> dict[str, tuple[LLMOutput, int, SamplingParams]]:
        """Fan each prompt out into n engine requests; returns child id -> (result, index, params)."""
        children = {}
        try:
            for (_, ids), sp, result in zip(encoded, params, results, strict=True):
                for j in range(sp.n):
                    seed = None if sp.seed is None else sp.seed + j
                    # The prompt's logprobs are the same for every choice: the first computes them.
                    prompt_lp = sp.prompt_logprobs if j == 0 else None
                    child = sp.clone(n=1, seed=seed, prompt_logprobs=prompt_lp)
                    rid = f"llm-{self._counter}"
                    self._counter += 1
                    self.engine.add_request(rid, ids, child)
                    result.outputs.append(
                        CompletionOutput(j, "", [], None, [] if sp.logprobs is not None else None)
                    )
                    children[rid] = (result, j, child)
        except Exception:
            for rid in children:
                self.engine.abort_request(rid)
            raise
        return children

    def _run(self, children, total: int, use_tqdm: bool) -> None:
        bar = tqdm(total=total, desc="generating", disable=not use_tqdm or total < 2)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id in children:
                        self._absorb(out, *children[out.request_id])
                        bar.update(int(out.finished))
        finally:
            bar.close()

    def _absorb(
        self, out: RequestOutput, result: LLMOutput, index: int, params: SamplingParams
    ) -> None:
        comp = result.outputs[index]
        result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
        comp.token_ids.extend(out.new_token_ids)
        if out.prompt_logprobs is not None:
            ids = result.prompt_token_ids
            positions = zip(ids[1:], out.prompt_logprobs, strict=True)
            result.prompt_logprobs = [None] + [self._position(t, lp) for t, lp in positions]
        if comp.logprobs is not None and out.new_logprobs:
            for lp, tok in zip(out.new_logprobs, out.new_token_ids, strict=True):
                comp.logprobs.append(self._position(tok, lp))
                comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + lp.logprob
        if out.finished:
            comp.finish_reason = out.finish_reason
            comp.stop_reason = out.stop_reason
            comp.text = self._final_text(comp.token_ids, params, out.finish_reason, out.stop_reason)

    def _position(self, token_id: int, lp: TokenLogprob) -> PositionLogprobs:
        """vLLM's dict for one position: its token first, then the top-N ranked 1, 2, ..."""
        entry = {token_id: Logprob(lp.logprob, lp.rank, self._token_text(token_id))}
        for rank, (tid, value) in enumerate(lp.top.items(), start=1):
            entry[tid] = Logprob(value, rank, self._token_text(tid))
        return entry

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _final_text(
        self, token_ids: list[int], params: SamplingParams, finish_reason, stop_reason
    ) -> str:
        if (
            finish_reason == "stop"
            and not isinstance(stop_reason, str)
            and not params.include_stop_str_in_output
        ):
            token_ids = token_ids[:-1]  # the stop token (EOS or stop_token_ids): no text
        text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        if isinstance(stop_reason, str):
            cut = text.find(stop_reason)
            if cut >= 0:
                text = text[: cut + (len(stop_reason) if params.include_stop_str_in_output else 0)]
        return text


def _default_sampling_params(setting: str, model: str) -> SamplingParams:
    """The generation config's defaults, checked as any SamplingParams (ValueError if bad)."""
    defaults = load_sampling_defaults(setting, model)
    try:
        params = SamplingParams(**defaults)
    except ValueError as exc:
        raise ValueError(f"generation config {setting!r} ({model}): {exc}") from None
    log.info(describe(setting, model, defaults))
    return params


def _per_prompt(sampling_params, n: int) -> list[SamplingParams]:
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
