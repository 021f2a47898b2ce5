"""The rejection sampler preserves the target distribution: checked against p exactly over many
draws, with a threshold that a wrong residual fails (shown by breaking it)."""

from __future__ import annotations

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.spec_decode import rejection_sampler
from engine.spec_decode.rejection_sampler import RejectionSampler

V = 8
N = 4000
# chi-square critical value, 7 degrees of freedom, p = 1e-4
CHI2_CRIT = 29.88
# Target p and draft q far apart, so a wrong residual moves the output a long way.
P = torch.tensor([0.30, 0.05, 0.20, 0.05, 0.15, 0.05, 0.15, 0.05])
Q = torch.tensor([0.02, 0.40, 0.02, 0.30, 0.02, 0.20, 0.02, 0.02])


def _first_tokens(draft_probs: torch.Tensor | None, propose) -> torch.Tensor:
    """Emitted first tokens of N requests with target p (temperature 1) and one proposal each."""
    gen = torch.Generator().manual_seed(1)
    requests = [Request(str(i), [0], SamplingParams(temperature=1.0)) for i in range(N)]
    drafts = [[int(t)] for t in propose(gen)]
    logits = P.log().repeat(2 * N, 1)  # (2N, V): each request's verify row and bonus row
    sampler = Sampler(V, set(), seed=0)
    qs = [draft_probs.unsqueeze(0) if draft_probs is not None else None] * N
    out = RejectionSampler(sampler)(logits, requests, drafts, qs)
    return torch.tensor([v.token_ids[0] for v in out])


def _chi2(tokens: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=V).double()
    expected = P.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def _draft_sampled(gen):
    return torch.multinomial(Q, N, replacement=True, generator=gen)


def _ngram_like(gen):  # point-mass proposals: always the target's likeliest token
    return torch.zeros(N, dtype=torch.long)


def test_draft_model_proposals_keep_the_target_distribution():
    assert _chi2(_first_tokens(Q, _draft_sampled)) < CHI2_CRIT


def test_point_mass_proposals_keep_the_target_distribution():
    assert _chi2(_first_tokens(None, _ngram_like)) < CHI2_CRIT


@pytest.mark.parametrize("draft", ["draft_model", "ngram"])
def test_a_wrong_residual_fails_the_same_threshold(monkeypatch, draft):
    # Resampling from p itself after a rejection (a common mistake) over-weights what q favours.
    monkeypatch.setattr(rejection_sampler, "residual", lambda p, q: p)
    if draft == "draft_model":
        tokens = _first_tokens(Q, _draft_sampled)
    else:
        tokens = _first_tokens(None, _ngram_like)
    assert _chi2(tokens) > 3 * CHI2_CRIT


def test_greedy_accepts_while_the_proposal_is_the_argmax():
    logits = torch.full((4, V), -5.0)
    for row, best in enumerate([3, 6, 1, 2]):
        logits[row, best] = 5.0
    request = Request("g", [0], SamplingParams(temperature=0))
    out = RejectionSampler(Sampler(V, set(), seed=0))(logits, [request], [[3, 6, 7]], [None])
    assert out[0].token_ids == [3, 6, 1]  # two accepted, the third replaced by the argmax
    assert out[0].num_accepted == 2
    out = RejectionSampler(Sampler(V, set(), seed=0))(logits, [request], [[3, 6, 1]], [None])
    assert out[0].token_ids == [3, 6, 1, 2]  # all accepted, plus the bonus token
