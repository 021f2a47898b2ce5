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


def _first_tokens(draft_probs: torch.Tensor | None, propose, bitmask=None) -> torch.Tensor:
    """Emitted first tokens of N requests with target p (temperature 1) and one proposal each."""
    gen = torch.Generator().manual_seed(1)
    requests = [Request(str(i), [0], SamplingParams(temperature=1.0)) for i in range(N)]
    drafts = [[int(t)] for t in propose(gen)]
    logits = P.log().repeat(2 * N, 1)  # (2N, V): each request's verify row and bonus row
    sampler = Sampler(V, set(), seed=0)
    qs = [draft_probs.unsqueeze(0) if draft_probs is not None else None] * N
    out = RejectionSampler(sampler)(logits, requests, drafts, qs, bitmask)
    return torch.tensor([v.token_ids[0] for v in out])


def _chi2(tokens: torch.Tensor, p: torch.Tensor = P) -> float:
    counts = torch.bincount(tokens, minlength=V).double()
    keep = p > 0
    expected = p.double() * len(tokens)
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# A grammar that forbids tokens 1 and 3, where q puts most of its mass: the bitmask's one int32
# word per row has those bits cleared. Target: p masked and renormalised.
FORBIDDEN = (1, 3)
MASKED_P = P.clone().index_fill_(0, torch.tensor(FORBIDDEN), 0.0)
MASKED_P /= MASKED_P.sum()
CHI2_CRIT_5DF = 25.74  # chi-square, 5 degrees of freedom (6 allowed tokens), p = 1e-4


def _grammar_bitmask() -> torch.Tensor:
    word = -1
    for t in FORBIDDEN:
        word &= ~(1 << t)
    return torch.full((2 * N, 1), word, dtype=torch.int32)


def test_proposals_a_grammar_forbids_are_rejected_and_p_is_the_masked_target():
    tokens = _first_tokens(Q, _draft_sampled, _grammar_bitmask())
    assert not any(int(t) in FORBIDDEN for t in tokens)
    assert _chi2(tokens, MASKED_P) < CHI2_CRIT_5DF


def test_under_a_grammar_a_wrong_residual_fails_the_same_threshold(monkeypatch):
    monkeypatch.setattr(rejection_sampler, "residual", lambda p, q: p)
    assert _chi2(_first_tokens(Q, _draft_sampled, _grammar_bitmask()), MASKED_P) > 3 * CHI2_CRIT_5DF


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
