"""prompt_logprobs through real processes (gateway, prefill and decode workers, tiny random
Llama) with the official `openai` client: a prompt prefilled remotely and one prefilled on the
decode worker, streamed and not, equal the offline `LLM`'s."""

from __future__ import annotations

import openai
import pytest
from test_gateway_integration import (
    LONG_PROMPT,
    SHORT_PROMPT,
    cluster,  # noqa: F401  (fixture: the three processes)
    remote_prefills,
)

from engine.llm import LLM
from engine.sampling_params import SamplingParams

K = 2


@pytest.fixture(scope="module")
def offline(tiny_llama):
    """Per prompt: its token ids and the offline LLM's prompt logprobs."""
    llm = LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=K)
    outs = llm.generate([LONG_PROMPT, SHORT_PROMPT], params, use_tqdm=False)
    return {o.prompt: (o.prompt_token_ids, o.prompt_logprobs) for o in outs}


def assert_equal(got, want):
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:], strict=True):
        assert list(g) == [str(t) for t in w]  # the prompt token first, then the top-K
        for token_id, lp in w.items():
            entry = g[str(token_id)]
            assert entry["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
            assert (entry["rank"], entry["decoded_token"]) == (lp.rank, lp.decoded_token)


@pytest.mark.parametrize("prompt", [LONG_PROMPT, SHORT_PROMPT], ids=["remote", "local"])
def test_completion_choices_carry_the_offline_prompt_logprobs(cluster, offline, prompt):  # noqa: F811
    _, _, g = cluster
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused", max_retries=0)
    ids, want = offline[prompt]
    before = remote_prefills(g.http)
    out = client.completions.create(
        model="tiny", prompt=ids, max_tokens=2, temperature=0.0, extra_body={"prompt_logprobs": K}
    )
    assert remote_prefills(g.http) == before + (prompt == LONG_PROMPT)
    assert_equal(out.choices[0].model_extra["prompt_logprobs"], want)
    assert_equal(out.choices[0].to_dict()["prompt_logprobs"], want)
    stream = client.completions.create(
        model="tiny", prompt=ids, max_tokens=4, temperature=0.0, stream=True,
        extra_body={"prompt_logprobs": K},
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert len(chunks) > 1
    assert_equal(chunks[0].model_extra["prompt_logprobs"], want)
    assert all("prompt_logprobs" not in c.model_extra for c in chunks[1:])


def test_echo_with_logprobs_scores_the_prompt_as_offline(cluster, offline):  # noqa: F811
    """What a loglikelihood scorer sends (echo, logprobs, 1 token): the prompt's token logprobs
    equal the offline LLM's prompt logprobs."""
    _, _, g = cluster
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused", max_retries=0)
    ids, want = offline[LONG_PROMPT]
    out = client.completions.create(
        model="tiny", prompt=ids, max_tokens=1, temperature=0.0, echo=True, logprobs=1
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    for i, token_id in enumerate(ids[1:], start=1):
        assert lp.token_logprobs[i] == pytest.approx(want[i][token_id].logprob, abs=1e-4)
