"""Vectorised sampling for one batch of rows (one row per request that samples this step).

Order: penalties -> logit_bias -> allowed_token_ids -> min_tokens masking -> structured-output
bitmask -> temperature -> top-k / top-p / min-p -> draw.
Greedy rows take argmax. Seeded rows draw with their own torch.Generator, so a seeded request
is reproducible whatever else shares the batch; the others share the engine's generator.
Logprobs are those of the model's raw distribution (log_softmax of the logits), as vLLM reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.logprobs import gather_logprobs
from engine.outputs import TokenLogprob
from engine.request import Request
from engine.structured_output import apply_bitmask


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass(slots=True)
class Distributions:
    """What the sampler would draw from, row by row (the rejection sampler's p)."""

    raw: torch.Tensor  # (S, V) the model's logits (logprobs are reported from these)
    logits: torch.Tensor  # (S, V) after penalties and min_tokens masking (greedy takes argmax)
    probs: torch.Tensor | None  # (S, V) after temperature and top-k/p/min-p; None: all greedy


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: set[int], seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request], bitmask: torch.Tensor | None = None
    ) -> SamplerOutput:
        """`bitmask`: (S, ceil(V / 32)) int32 allowed-token rows from the structured-output
        manager, or None when no row is constrained."""
        raw, logits = self._processed(logits, requests, bitmask)
        tokens = self._draw(logits, requests)
        return SamplerOutput(tokens.tolist(), self._logprobs(raw, tokens, requests))

    def distributions(
        self, logits: torch.Tensor, rows: list, bitmask: torch.Tensor | None = None
    ) -> Distributions:
        """The distributions `__call__` draws from, without drawing. `rows` are requests or
        anything with their `params`, token lists and `num_output_tokens`; `bitmask` as for
        `__call__`, one row per logits row."""
        raw, logits = self._processed(logits, rows, bitmask)
        if all(r.params.greedy for r in rows):
            return Distributions(raw, logits, None)
        temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows]).unsqueeze(1)
        return Distributions(raw, logits, _filter(logits / temps, rows).softmax(dim=-1))

    def _processed(
        self, logits: torch.Tensor, rows: list, bitmask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, processed) (S, V) float32 logits: the model's, for logprobs, and those after
        penalties, token edits, min_tokens masking and the bitmask, which the draw uses."""
        logits = logits[:, : self.vocab_size].float().cpu()  # (S, V)
        raw = logits
        edits = any(_edits_logits(r) for r in rows)
        if edits or bitmask is not None:  # keep `raw` for logprobs
            logits = logits.clone()
        if edits:
            logits = self._apply_penalties(logits, rows)
            _apply_token_edits(logits, rows)
            self._mask_early_stop(logits, rows)
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        return raw, logits

    def logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, rows: list):
        """Per row: the logprob, rank and top-N of `tokens[i]` from the raw logits, or None if
        not asked."""
        return self._logprobs(raw, tokens, rows)

    def skip_draw(self, generator: torch.Generator) -> None:
        """Consume exactly what one sampled token consumes from a request's generator."""
        torch.rand((), generator=generator)

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if _has_penalties(r.params)]
        for i in rows:  # only rows that ask for penalties pay for them
            p = requests[i].params
            out_ids = torch.tensor(requests[i].output_token_ids, dtype=torch.long)
            counts = torch.bincount(out_ids, minlength=logits.shape[1])[: logits.shape[1]].float()
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(logits.shape[1], dtype=torch.bool)
                seen[torch.tensor(requests[i].all_token_ids, dtype=torch.long)] = True
                row = logits[i]
                penalised = torch.where(
                    row > 0, row / p.repetition_penalty, row * p.repetition_penalty
                )
                logits[i] = torch.where(seen, penalised, row)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    def _mask_early_stop(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens:
                banned = list(r.params.stop_token_ids) + (
                    [] if r.params.ignore_eos else list(self.eos_token_ids)
                )
                if banned:
                    logits[i, [t for t in banned if t < logits.shape[1]]] = float("-inf")

    def _draw(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        greedy = torch.tensor([r.params.greedy for r in requests])
        tokens = logits.argmax(dim=-1)
        if bool(greedy.all()):
            return tokens
        temps = torch.tensor([max(r.params.temperature, 1e-5) for r in requests]).unsqueeze(1)
        probs = _filter(logits / temps, requests).softmax(dim=-1)  # (S, V)
        # Inverse-CDF draw: one uniform per row (an exponential race would need V of them, the
        # larger part of a CPU step at batch 64). u in (0, 1], so a zero-probability token,
        # whose CDF equals its predecessor's, is never the first entry >= u * total.
        u = 1.0 - torch.rand(len(requests), generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None and not r.params.greedy:
                u[i] = 1.0 - torch.rand((), generator=r.generator)
        cdf = probs.cumsum(dim=-1)  # (S, V)
        sampled = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        sampled = sampled.clamp_(max=probs.shape[1] - 1)
        return torch.where(greedy, tokens, sampled)

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request]):
        wanted = [r.params.logprobs for r in requests]
        if all(w is None for w in wanted):
            return [None] * len(requests)
        return gather_logprobs(raw.log_softmax(dim=-1), tokens, wanted)


def _has_penalties(p) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def _edits_logits(r: Request) -> bool:
    """Penalties, logit_bias, allowed_token_ids or min_tokens masking change this request's row
    before the draw."""
    p = r.params
    return (
        _has_penalties(p)
        or bool(p.logit_bias or p.allowed_token_ids or p.bad_words)
        or r.num_output_tokens < p.min_tokens
    )


def _apply_token_edits(logits: torch.Tensor, requests: list) -> None:
    """logit_bias is added to its tokens' logits; with allowed_token_ids every other token is
    -inf; a bad word's last token is -inf wherever the output ends with the rest of it. Ids past
    the logits' width are dropped (the engine refuses them at admission)."""
    width = logits.shape[1]
    for i, r in enumerate(requests):
        p = r.params
        sequences = getattr(r, "bad_words_token_ids", ())
        if sequences:
            output = r.output_token_ids
            for seq in sequences:
                prefix = seq[:-1]
                if seq[-1] < width and (not prefix or output[-len(prefix) :] == prefix):
                    logits[i, seq[-1]] = float("-inf")
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < width]
            logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids])
        if p.allowed_token_ids:
            keep = torch.tensor([t for t in p.allowed_token_ids if t < width], dtype=torch.long)
            row = torch.full((width,), float("-inf"))
            row[keep] = logits[i, keep]
            logits[i] = row


def _filter(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """top-k, top-p and min-p over a batch, one sort for all rows."""
    top_k = torch.tensor([r.params.top_k or logits.shape[1] for r in requests])
    top_p = torch.tensor([r.params.top_p for r in requests])
    min_p = torch.tensor([r.params.min_p for r in requests])
    if bool((top_k >= logits.shape[1]).all() and (top_p >= 1.0).all() and (min_p <= 0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1])[None, :]
    remove = ranks >= top_k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    remove |= (cum - probs) > top_p[:, None]  # keep the smallest set reaching top_p
    remove |= probs < (min_p[:, None] * probs[:, :1])
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
