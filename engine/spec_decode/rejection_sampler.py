"""Verification of proposed tokens by rejection sampling (Leviathan et al., Chen et al.).

For a request with proposals d_1..d_k drawn from q_1..q_k, the target's k + 1 rows give
p_0..p_k (each the distribution the plain sampler would draw from at that position: penalties,
min_tokens, temperature, top-k/p, min-p, computed as if the earlier proposals were already
output). Proposal d_i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)); the first
rejected one is replaced by a draw from the residual max(0, p_{i-1} - q_i), normalised; if all
are accepted a bonus token is drawn from p_k. Every emitted token is then distributed exactly as
the plain sampler's. A proposer with no distribution (n-gram lookup) is a point mass: q = one-hot.
Greedy rows reduce to "accept while the proposal is the argmax, then emit the argmax".
A structured-output request's rows carry its grammar's bitmask for the position they verify
(row j: the matcher advanced over the first j proposals), so p is the masked distribution and a
proposal the grammar forbids has p = 0: it is always rejected, and the residual is drawn under
the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.request import Request
from engine.sampler import Sampler


class RowView:
    """Request `request` as it would stand after the first `num_extra` proposals were output:
    what the sampler's penalties and min_tokens need for verify row `num_extra`."""

    __slots__ = ("request", "extra", "params", "generator")

    def __init__(self, request: Request, extra: list[int]) -> None:
        self.request = request
        self.extra = extra
        self.params = request.params
        self.generator = request.generator

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.all_token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + self.extra

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens + len(self.extra)

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        return self.request.bad_words_token_ids


@dataclass(slots=True)
class Verified:
    token_ids: list[int]  # accepted proposals, then the replacement or bonus token
    logprobs: list[TokenLogprob | None]
    num_accepted: int


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejection at this position draws from: max(0, p - q), unnormalised."""
    return (p - q).clamp_(min=0.0)


class RejectionSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(
        self,
        logits: torch.Tensor,  # (sum(k_r + 1), V): each request's k_r + 1 verify rows in order
        requests: list[Request],
        proposals: list[list[int]],
        draft_probs: list[torch.Tensor | None],  # per request (k_r, V), or None: point masses
        bitmask: torch.Tensor | None = None,  # (sum(k_r + 1), V / 32) grammar rows, or None
    ) -> list[Verified]:
        views = [
            RowView(r, d[:j])
            for r, d in zip(requests, proposals, strict=True)
            for j in range(len(d) + 1)
        ]
        dist = self.sampler.distributions(logits, views, bitmask)
        raw = dist.raw
        out, row = [], 0
        for request, drafts, q in zip(requests, proposals, draft_probs, strict=True):
            n = len(drafts) + 1
            if request.params.greedy:  # the argmax of the processed logits, penalties included
                tokens = _verify_greedy(dist.logits[row : row + n], drafts)
            else:
                tokens = _verify_sampled(dist.probs[row : row + n], drafts, q, self._gen(request))
            logprobs = self.sampler.logprobs(
                raw[row : row + len(tokens)], torch.tensor(tokens), views[row : row + len(tokens)]
            )
            out.append(Verified(tokens, logprobs, len(tokens) - 1))
            row += n
        return out

    def _gen(self, request: Request) -> torch.Generator:
        return request.generator if request.generator is not None else self.sampler.generator


def _verify_greedy(scores: torch.Tensor, drafts: list[int]) -> list[int]:
    best = scores.argmax(dim=-1).tolist()  # (k + 1,)
    tokens = []
    for i, d in enumerate(drafts):
        if d != best[i]:
            break
        tokens.append(d)
    tokens.append(best[len(tokens)])
    return tokens


def _verify_sampled(
    p: torch.Tensor,  # (k + 1, V) target distributions
    drafts: list[int],
    q: torch.Tensor | None,  # (k, V) draft distributions, or None: point masses on drafts
    gen: torch.Generator,
) -> list[int]:
    tokens = []
    for i, d in enumerate(drafts):
        q_i = q[i] if q is not None else _one_hot(d, p.shape[1])
        u = float(torch.rand((), generator=gen))
        if u * float(q_i[d]) < float(p[i, d]):  # accept with probability min(1, p/q)
            tokens.append(d)
            continue
        res = residual(p[i].clone(), q_i)
        tokens.append(draw(res if float(res.sum()) > 0 else p[i], gen))
        return tokens
    tokens.append(draw(p[len(drafts)], gen))
    return tokens


def _one_hot(token: int, size: int) -> torch.Tensor:
    q = torch.zeros(size)
    q[token] = 1.0
    return q


def draw(weights: torch.Tensor, gen: torch.Generator) -> int:
    """One draw from unnormalised `weights` by inverse CDF (u in (0, 1]: a zero weight never wins)."""
    cdf = weights.cumsum(dim=0)
    u = 1.0 - float(torch.rand((), generator=gen))
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]))[0])
    return min(idx, weights.shape[0] - 1)
