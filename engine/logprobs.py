"""Logprob info from logits rows: the logprob and rank of one token per row, and the top-N.

Shared by the sampler (the sampled tokens) and the engine's prompt logprobs (each prompt token
given those before it). Logprobs are those of the model's raw distribution, in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.outputs import TokenLogprob

# Prompt rows are normalised this many at a time: a whole prefill chunk's (T, V) float32
# logits are already there, and a second full-size temporary would double them.
_PROMPT_ROWS_PER_SLICE = 256


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, wanted: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """`logprobs` (R, V) log_softmax rows, `token_ids` (R,): per row, the logprob and rank of
    `token_ids[i]` with the top-`wanted[i]`, or None where `wanted[i]` is None.

    The rank counts the tokens at least as likely (vLLM's), so a tie ranks after its equals."""
    if all(w is None for w in wanted):
        return [None] * len(wanted)
    token_ids = token_ids.to(logprobs.device)
    chosen = logprobs.gather(1, token_ids[:, None])  # (R, 1)
    ranks = (logprobs >= chosen).sum(dim=-1).tolist()
    chosen_list = chosen.squeeze(1).tolist()
    k = max(w or 0 for w in wanted)
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    top_vals = top_vals.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    out: list[TokenLogprob | None] = []
    for i, w in enumerate(wanted):
        if w is None:
            out.append(None)
            continue
        top = dict(zip(top_ids[i][:w], top_vals[i][:w], strict=True)) if w else {}
        out.append(TokenLogprob(chosen_list[i], top, ranks[i]))
    return out


def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """`logits` (R, >= V) at R consecutive prompt positions, `next_ids` the R prompt tokens
    after them: each one's logprob and rank given the tokens before it, with the top-`k`."""
    out: list[TokenLogprob] = []
    for lo in range(0, len(next_ids), _PROMPT_ROWS_PER_SLICE):
        hi = min(lo + _PROMPT_ROWS_PER_SLICE, len(next_ids))
        rows = logits[lo:hi].float().log_softmax(dim=-1)  # (r, V)
        ids = torch.tensor(next_ids[lo:hi], dtype=torch.long)
        out.extend(gather_logprobs(rows, ids, [k] * (hi - lo)))  # type: ignore[arg-type]
    return out
