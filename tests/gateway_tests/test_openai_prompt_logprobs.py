"""vLLM's `prompt_logprobs` through the gateway (fake workers, so the values are known): on each
completion choice (streamed: its first chunk), top-level in chat, and in the gRPC front door;
from the prefill worker for a prompt prefilled remotely, from the decode worker otherwise."""

from __future__ import annotations

import openai
import pytest
from test_gateway_fakes import (
    FAKE_PROMPT_LOGPROB,
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
)

from gateway.tokenizer import GatewayTokenizer
from pdserve.client import GatewayClient, GenerationOptions

LONG_PROMPT = "a prompt that is long enough to be prefilled remotely"  # >= 8 tokens
SHORT_PROMPT = "hi"  # prefilled on the decode worker


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    prefill = FakeWorker("prefill", reply, eos).start()
    decode = FakeWorker("decode", reply, eos).start()
    harness = GatewayHarness(make_config(folder, [prefill], [decode], min_prefill_tokens=8))
    harness.tok, harness.decode = tok, decode
    harness.client = openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="unused")
    yield harness
    harness.close()
    prefill.stop()
    decode.stop()


def expected(tok, ids: list[int], role: str, k: int) -> list:
    """What the fake worker of `role` computes for prompt `ids`, in vLLM's JSON shape."""

    def entry(token_id, logprob, rank):
        return {"logprob": logprob, "rank": rank, "decoded_token": tok.token_text(token_id)}

    body: list = [None]
    for i, token_id in enumerate(ids[1:]):
        position = {str(token_id): entry(token_id, FAKE_PROMPT_LOGPROB[role] - i / 8, i + 1)}
        position.update({str(t): entry(t, -0.25 * (t + 1), t + 1) for t in range(k)})
        body.append(position)
    return body


@pytest.mark.parametrize("prompt, role", [(LONG_PROMPT, "prefill"), (SHORT_PROMPT, "decode")])
def test_each_completion_choice_has_them(gw, prompt, role):
    out = gw.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=2, n=2, extra_body={"prompt_logprobs": 2}
    )
    want = expected(gw.tok, gw.tok.encode(prompt), role, 2)
    assert [c.model_extra["prompt_logprobs"] for c in out.choices] == [want, want]
    assert out.choices[0].text == gw.tok.decode(gw.tok.encode(REPLY)[:2])
    plain = gw.client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert plain.choices[0].model_extra["prompt_logprobs"] is None  # as vLLM: null, not asked


def test_several_prompts_and_zero(gw):
    ids = gw.tok.encode(LONG_PROMPT)
    out = gw.client.completions.create(
        model="tiny", prompt=[ids, [7]], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    first, one_token = (c.model_extra["prompt_logprobs"] for c in out.choices)
    assert first == expected(gw.tok, ids, "prefill", 0)
    assert one_token == [None]  # nothing predicts a prompt's only token


@pytest.mark.parametrize("prompt, role", [(LONG_PROMPT, "prefill"), (SHORT_PROMPT, "decode")])
def test_streamed_on_each_choices_first_chunk(gw, prompt, role):
    stream = gw.client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=4,
        n=2,
        stream=True,
        extra_body={"prompt_logprobs": 1},
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    want = expected(gw.tok, gw.tok.encode(prompt), role, 1)
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert len(mine) > 1 and mine[0].model_extra["prompt_logprobs"] == want
        assert all("prompt_logprobs" not in c.model_extra for c in mine[1:])
        assert "".join(c.text for c in mine) == gw.tok.decode(gw.tok.encode(REPLY)[:4])


@pytest.mark.parametrize("prompt, role", [(LONG_PROMPT, "prefill"), (SHORT_PROMPT, "decode")])
def test_echo_with_logprobs_covers_the_prompt_then_the_completion(gw, prompt, role):
    """OpenAI's legacy echo + logprobs (what loglikelihood scorers send), as vLLM builds it:
    the prompt's tokens first (the first with null), from its prompt logprobs."""
    ids, reply = gw.tok.encode(prompt), gw.tok.encode(REPLY)[:3]
    out = gw.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=1
    )
    choice = out.choices[0]
    lp = choice.logprobs
    want = expected(gw.tok, ids, role, 1)
    assert choice.text == prompt + gw.tok.decode(reply)
    assert lp.tokens == [gw.tok.token_text(t) for t in [*ids, *reply]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i, token_id in enumerate(ids[1:], start=1):
        position = want[i]
        assert lp.token_logprobs[i] == position[str(token_id)]["logprob"]
        assert lp.top_logprobs[i] == {
            gw.tok.token_text(int(t)): e["logprob"] for t, e in position.items()
        }
    assert lp.token_logprobs[len(ids) :] == [-0.5] * 3  # the fake decode's sampled logprobs
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(prompt)
    assert lp.text_offset == sorted(lp.text_offset)
    assert choice.model_extra["prompt_logprobs"] is None  # not asked for: only in the logprobs
    stream = gw.client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=1, stream=True
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.logprobs.tokens] == lp.tokens
    assert [v for c in chunks for v in c.logprobs.token_logprobs] == lp.token_logprobs
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp.text_offset


def test_chat_has_them_top_level(gw):
    messages = [{"role": "user", "content": "hi"}]
    out = gw.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, n=2, extra_body={"prompt_logprobs": 1}
    )
    ids = list(gw.decode.calls.decodes[-1].prompt_token_ids)  # the rendered template, >= 8
    want = expected(gw.tok, ids, "prefill", 1)
    assert out.model_extra["prompt_logprobs"] == want
    assert all("prompt_logprobs" not in c.model_extra for c in out.choices)
    stream = gw.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, n=2, stream=True,
        extra_body={"prompt_logprobs": 1},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].model_extra["prompt_logprobs"] == want
    assert all("prompt_logprobs" not in c.model_extra for c in chunks[1:])


def test_over_the_limit_is_a_400_naming_it(gw):
    for create in (
        lambda body: gw.client.completions.create(
            model="tiny", prompt="hi", max_tokens=1, extra_body=body
        ),
        lambda body: gw.client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1,
            extra_body=body,
        ),  # fmt: skip
    ):
        for bad in (21, -1):
            with pytest.raises(openai.BadRequestError) as err:
                create({"prompt_logprobs": bad})
            assert err.value.body["param"] == "prompt_logprobs"


def test_grpc_front_door_carries_them(gw):
    ids = gw.tok.encode(LONG_PROMPT)
    with GatewayClient(gw.grpc_address, timeout=20) as client:
        result = client.generate(
            LONG_PROMPT, GenerationOptions(max_tokens=2, n=2, prompt_logprobs=1)
        )
    for choice in result.choices:
        got = choice.prompt_logprobs
        assert [lp.token_id for lp in got] == ids[1:]
        assert [lp.rank for lp in got] == list(range(1, len(ids)))
        assert [lp.logprob for lp in got] == [-1.0 - i / 8 for i in range(len(ids) - 1)]
        assert all(lp.top == ((0, -0.25),) for lp in got)
