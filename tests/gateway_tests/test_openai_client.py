"""The official `openai` client against the gateway (fake workers), plus the info routes."""

from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pytest
from test_gateway_fakes import (
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
    wait_until,
)

from gateway.tokenizer import GatewayTokenizer

LONG_PROMPT = "a prompt that is long enough to be prefilled remotely"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    prefill = FakeWorker("prefill", reply, eos).start()
    decode = FakeWorker("decode", reply, eos).start()
    harness = GatewayHarness(make_config(folder, [prefill], [decode], min_prefill_tokens=8))
    harness.prefill, harness.decode, harness.tok = prefill, decode, tok
    harness.client = openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="unused")
    yield harness
    harness.close()
    prefill.stop()
    decode.stop()


def n_reply(gw) -> int:
    return len(gw.tok.encode(REPLY))


def test_completion(gw):
    out = gw.client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=n_reply(gw))
    assert out.choices[0].text == REPLY
    assert out.choices[0].finish_reason == "length"
    prompt_len = len(gw.tok.encode(LONG_PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, n_reply(gw))
    assert out.usage.total_tokens == prompt_len + n_reply(gw)
    assert out.model == "tiny" and out.id.startswith("cmpl-")


def test_completion_default_max_tokens_is_16(gw):
    out = gw.client.completions.create(model="tiny", prompt="hi")
    assert out.usage.completion_tokens == 16


def test_completion_stream_with_usage(gw):
    stream = gw.client.completions.create(
        model="tiny",
        prompt="hi",
        max_tokens=n_reply(gw),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_reply(gw)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_n2_and_several_prompts(gw):
    out = gw.client.completions.create(model="tiny", prompt=["hi", "you"], max_tokens=3, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hell" for c in out.choices)
    assert out.usage.prompt_tokens == 2 + 3 and out.usage.completion_tokens == 12
    out = gw.client.completions.create(model="tiny", prompt=[[5, 6], [7]], max_tokens=1)
    assert len(out.choices) == 2 and out.usage.prompt_tokens == 3


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(gw):
    ids = gw.tok.encode(LONG_PROMPT)
    out = gw.client.completions.create(
        model="tiny", prompt=LONG_PROMPT, max_tokens=2, echo=True,
        extra_body={"truncate_prompt_tokens": 3},
    )  # fmt: skip
    assert list(gw.decode.calls.decodes[-1].prompt_token_ids) == ids[-3:]
    assert out.usage.prompt_tokens == 3
    assert out.choices[0].text == gw.tok.decode(ids[-3:], skip_special_tokens=False) + "He"
    chat = gw.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=2,
        extra_body={"truncate_prompt_tokens": -1},  # the whole context: nothing cut here
    )  # fmt: skip
    assert chat.usage.prompt_tokens == len(gw.decode.calls.decodes[-1].prompt_token_ids) > 3
    for bad in (0, -2, 10**9):
        with pytest.raises(openai.BadRequestError) as err:
            gw.client.completions.create(
                model="tiny", prompt="hi", max_tokens=2, extra_body={"truncate_prompt_tokens": bad}
            )
        assert err.value.body["param"] == "truncate_prompt_tokens"


def test_completion_stop_echo_and_logprobs(gw):
    out = gw.client.completions.create(
        model="tiny", prompt="hi", max_tokens=30, stop=["wor"], echo=True
    )
    assert out.choices[0].text == "hiHello "
    assert (out.choices[0].finish_reason, out.choices[0].model_extra["stop_reason"]) == (
        "stop",
        "wor",
    )
    out = gw.client.completions.create(model="tiny", prompt="hi", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == ["H", "e", "ll"] and lp.token_logprobs == [-0.5] * 3
    assert [len(t) for t in lp.top_logprobs] == [2, 2, 2] and lp.text_offset == [0, 1, 2]
    out = gw.client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=0)
    assert out.choices[0].logprobs.top_logprobs == [{"H": -0.5}, {"e": -0.5}]  # the sampled one


def test_chat(gw):
    out = gw.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=4
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "Hello"
    # the chat template was applied before tokenizing
    prompt = gw.decode.calls.decodes[-1].prompt_token_ids
    assert gw.tok.decode(prompt, skip_special_tokens=False) == (
        "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_continue_final_message_and_template_kwargs(gw):
    messages = [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Hello, my name"},
    ]
    out = gw.client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=4,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    assert out.choices[0].message.content == "Hello"
    prompt = gw.decode.calls.decodes[-1].prompt_token_ids
    assert gw.tok.decode(prompt, skip_special_tokens=False) == (
        "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\nHello, my name"
    )
    tokenized = httpx.post(f"{gw.http_url}/tokenize", json={
        "messages": messages, "continue_final_message": True, "add_generation_prompt": False,
    }).json()  # fmt: skip
    assert tokenized["tokens"] == list(prompt)
    with pytest.raises(openai.BadRequestError) as err:
        gw.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4,
            extra_body={"continue_final_message": True},  # add_generation_prompt defaults to true
        )  # fmt: skip
    assert err.value.body["param"] == "continue_final_message"
    with pytest.raises(openai.BadRequestError) as err:
        gw.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4,
            extra_body={"chat_template_kwargs": {"messages": []}},
        )  # fmt: skip
    assert err.value.body["param"] == "chat_template_kwargs"


def test_chat_text_parts_and_max_completion_tokens(gw):
    out = gw.client.chat.completions.create(
        model="tiny",
        max_completion_tokens=2,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
    )
    assert out.choices[0].message.content == "He"
    prompt = gw.decode.calls.decodes[-1].prompt_token_ids
    assert "<|im_start|>user\nab<|im_end|>" in gw.tok.decode(prompt, skip_special_tokens=False)


def test_chat_stream_role_then_content_then_usage(gw):
    stream = gw.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=n_reply(gw),
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=1,
    )
    chunks = list(stream)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in mine) == REPLY
        assert mine[-1].finish_reason == "length"
        assert sum(len(ch.logprobs.content) for ch in mine if ch.logprobs) == n_reply(gw)
    assert chunks[-1].usage.completion_tokens == 2 * n_reply(gw)


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(gw):
    ids = gw.tok.encode(REPLY)[:3]
    named = [f"token_id:{i}" for i in ids]
    extra = {"return_tokens_as_token_ids": True}
    out = gw.client.completions.create(model="tiny", prompt="hi", max_tokens=3, logprobs=1,
                                       extra_body=extra)  # fmt: skip
    lp = out.choices[0].logprobs
    assert lp.tokens == named and lp.text_offset == [0, 1, 2]  # offsets count the text
    assert all(next(iter(top)) == name for top, name in zip(lp.top_logprobs, named, strict=True))
    stream = gw.client.completions.create(model="tiny", prompt="hi", max_tokens=3, logprobs=0,
                                          stream=True, extra_body=extra)  # fmt: skip
    assert [t for c in stream for t in (c.choices[0].logprobs.tokens if c.choices and
            c.choices[0].logprobs else [])] == named  # fmt: skip
    chat = gw.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
        top_logprobs=1, extra_body=extra,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert [e.token for e in content] == named
    assert content[0].bytes == list(named[0].encode())
    assert all(e.top_logprobs[0].token.startswith("token_id:") for e in content)


def test_chat_logprobs_non_streaming(gw):
    out = gw.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert [e.token for e in content] == ["H", "e"]
    assert len(content[0].top_logprobs) == 3 and content[0].bytes == [72]


def test_seed_reaches_the_workers(gw):
    gw.client.completions.create(
        model="tiny",
        prompt="hi",
        max_tokens=2,
        seed=7,
        n=2,
        temperature=0.8,
        top_p=0.9,
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "ignore_eos": True,
            "stop_token_ids": [3],
        },
    )
    sent = sorted(gw.decode.calls.decodes[-2:], key=lambda d: d.request_id)
    assert [d.sampling.seed for d in sent] == [7, 8]
    s = sent[0].sampling
    assert (s.top_k, s.min_tokens, s.ignore_eos, list(s.stop_token_ids)) == (5, 1, True, [3])
    assert abs(s.temperature - 0.8) < 1e-6 and abs(s.repetition_penalty - 1.1) < 1e-6


def test_client_disconnect_mid_stream_aborts_end_to_end(gw):
    gw.decode.token_delay_s = 0.05
    try:
        with httpx.stream(
            "POST",
            f"{gw.http_url}/v1/completions",
            timeout=10,
            json={"prompt": LONG_PROMPT, "max_tokens": 200, "stream": True},
        ) as r:
            lines = r.iter_lines()
            next(lines)
        decode = gw.decode.calls.decodes[-1]
        wait_until(lambda: decode.request_id in gw.decode.calls.aborts)
        wait_until(lambda: decode.kv_handle.transfer_id in gw.prefill.calls.releases)
        wait_until(lambda: gw.core.num_in_flight == 0)
    finally:
        gw.decode.token_delay_s = 0.0
    metrics = httpx.get(f"{gw.http_url}/metrics").text
    assert 'pdserve:request_success_total{finished_reason="abort",model_name="tiny"}' in metrics


def test_models_version_tokenize_detokenize(gw):
    models = gw.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{gw.http_url}/version").json()["version"]
    ids = httpx.post(f"{gw.http_url}/tokenize", json={"prompt": "hello"}).json()
    assert ids["tokens"] == gw.tok.encode("hello") and ids["count"] == len(ids["tokens"])
    text = httpx.post(f"{gw.http_url}/detokenize", json={"tokens": ids["tokens"]}).json()
    assert text == {"prompt": "hello"}
    chat = httpx.post(
        f"{gw.http_url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}
    ).json()
    assert chat["count"] > 5
    assert httpx.post(f"{gw.http_url}/detokenize", json={"tokens": [10**8]}).status_code == 400


def test_metrics_cover_gateway_and_workers(gw):
    gw.client.completions.create(model="tiny", prompt="hi", max_tokens=4)
    gw.poll()
    text = httpx.get(f"{gw.http_url}/metrics").text
    for name in (
        "pdserve:time_to_first_token_seconds_bucket",
        "pdserve:inter_token_latency_seconds_bucket",
        "pdserve:e2e_request_latency_seconds_bucket",
        "pdserve:prompt_tokens_total",
        "pdserve:generation_tokens_total",
        'finished_reason="length"',
        "pdserve:num_requests_running{",
        "pdserve:num_requests_waiting{",
        "pdserve:kv_cache_usage_perc{",
        "pdserve:num_preemptions_total{",
    ):
        assert name in text, name


def test_health_is_503_without_a_healthy_decode_worker(gw):
    assert httpx.get(f"{gw.http_url}/health").status_code == 200
    gw.decode.serving = False
    try:
        gw.poll()
        response = httpx.get(f"{gw.http_url}/health")
        assert response.status_code == 503 and response.json()["status"] == "unavailable"
        out = httpx.post(f"{gw.http_url}/v1/completions", json={"prompt": "hi"})
        assert out.status_code == 503 and out.json()["error"]["code"] == 503
    finally:
        gw.decode.serving = True
        gw.poll()
    assert httpx.get(f"{gw.http_url}/health").status_code == 200


def test_worker_error_after_stream_start_is_an_error_event_then_done(gw):
    gw.decode.fail_after = 3
    try:
        with httpx.stream(
            "POST",
            f"{gw.http_url}/v1/completions",
            timeout=10,
            json={"prompt": "hi", "max_tokens": 100, "stream": True},
        ) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
    finally:
        gw.decode.fail_after = None
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == 500 and "died mid-stream" in error["message"]
    assert gw.core.num_in_flight == 0


def test_client_disconnect_before_a_non_streaming_answer_aborts(gw):
    gw.decode.token_delay_s = 0.05
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{gw.http_url}/v1/completions",
                timeout=0.3,
                json={"prompt": LONG_PROMPT, "max_tokens": 200},
            )
        decode = gw.decode.calls.decodes[-1]
        wait_until(lambda: decode.request_id in gw.decode.calls.aborts)
        wait_until(lambda: decode.kv_handle.transfer_id in gw.prefill.calls.releases)
        wait_until(lambda: gw.core.num_in_flight == 0)
    finally:
        gw.decode.token_delay_s = 0.0


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("stage", ["prefill", "first_token"])
def test_a_hang_up_before_the_first_sse_chunk_is_quiet(gw, stage):
    """Client gone before the stream's first chunk: at most one log line, no traceback (it
    used to be ~75 lines of 'aclose(): asynchronous generator is already running')."""
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(collect)
    if stage == "prefill":
        gw.prefill.prefill_delay_s = 1.0
    else:
        gw.decode.token_delay_s = 1.0
    try:
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                with httpx.stream("POST", f"{gw.http_url}/v1/completions", timeout=0.3,
                                  json={"prompt": LONG_PROMPT, "max_tokens": 3,
                                        "stream": True}) as response:  # fmt: skip
                    for _ in response.iter_lines():
                        pass
        wait_until(lambda: gw.core.num_in_flight == 0, timeout=10)
        time.sleep(1.2)  # the delayed worker call ends and its result is thrown away
    finally:
        gw.prefill.prefill_delay_s = 0.0
        gw.decode.token_delay_s = 0.0
        for logger in loggers:
            logger.removeHandler(collect)
    noisy = [r for r in collect.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not [r for r in noisy if r.exc_info], [r.getMessage() for r in noisy]
    assert len(noisy) <= 3, [r.getMessage() for r in noisy]  # one line per hang-up at most
