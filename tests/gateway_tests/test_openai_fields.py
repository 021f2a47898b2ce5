"""Every request field vLLM documents for /v1/completions and /v1/chat/completions is either
honoured (accepted; its effect is tested where it is implemented), harmless metadata (accepted,
listed in `gateway.openai.fields.IGNORED`), or refused with a 400 naming it. Sent with the
official `openai` client (fake workers: only the gateway's treatment is under test)."""

from __future__ import annotations

import openai
import pytest
from test_gateway_fakes import REPLY, FakeWorker, GatewayHarness, build_tiny_model_folder
from test_gateway_fakes import make_config as _make_config

from gateway.openai.fields import IGNORED
from gateway.tokenizer import GatewayTokenizer

OK, META, NO = "honoured", "ignored", "refused"
SCHEMA = {"type": "object"}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]

# Shared by both routes: (field, a value that asks for something, treatment, other fields needed)
COMMON = [
    ("frequency_penalty", 0.5, OK, {}),
    ("presence_penalty", 0.5, OK, {}),
    ("logit_bias", {"5": 1.0}, OK, {}),
    ("n", 2, OK, {}),
    ("seed", 7, OK, {}),
    ("stop", ["\n"], OK, {}),
    ("stream", True, OK, {}),
    ("stream_options", {"include_usage": True}, OK, {"stream": True}),
    ("stream_options", {"continuous_usage_stats": True}, OK, {"stream": True}),
    ("temperature", 0.5, OK, {}),
    ("top_p", 0.5, OK, {}),
    ("user", "u1", META, {}),
    ("top_k", 5, OK, {}),
    ("min_p", 0.1, OK, {}),
    ("repetition_penalty", 1.2, OK, {}),
    ("stop_token_ids", [5], OK, {}),
    ("include_stop_str_in_output", True, OK, {}),
    ("ignore_eos", True, OK, {}),
    ("min_tokens", 1, OK, {}),
    ("skip_special_tokens", False, OK, {}),
    ("response_format", {"type": "json_object"}, OK, {}),
    (
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
        OK,
        {},
    ),
    ("structured_outputs", {"regex": "[ab]+"}, OK, {}),
    ("guided_json", SCHEMA, OK, {}),
    ("guided_regex", "[ab]+", OK, {}),
    ("guided_choice", ["a", "b"], OK, {}),
    ("guided_grammar", 'root ::= "a"', OK, {}),
    ("guided_decoding_backend", "xgrammar", META, {}),
    ("guided_whitespace_pattern", " ", NO, {}),
    ("use_beam_search", True, NO, {}),
    ("length_penalty", 0.5, NO, {}),
    ("spaces_between_special_tokens", False, NO, {}),
    ("truncate_prompt_tokens", 4, OK, {}),
    ("prompt_logprobs", 1, OK, {}),
    ("allowed_token_ids", [5, 6], OK, {}),
    ("bad_words", ["x"], OK, {}),
    ("priority", 1, META, {}),
    ("request_id", "r1", META, {}),
    ("logits_processors", ["mod.Proc"], NO, {}),
    ("return_tokens_as_token_ids", True, OK, {}),
    ("cache_salt", "salt", META, {}),
    ("kv_transfer_params", {"do_remote_decode": True}, NO, {}),
    ("vllm_xargs", {"k": 1}, NO, {}),
    ("metadata", {"k": "v"}, META, {}),
    ("store", True, META, {}),
    ("service_tier", "auto", META, {}),
    ("a_field_nobody_defined", 1, NO, {}),
]
COMPLETIONS = COMMON + [
    ("max_tokens", 3, OK, {}),
    ("logprobs", 2, OK, {}),
    ("echo", True, OK, {}),
    ("echo", True, OK, {"logprobs": 1}),
    ("suffix", "end", NO, {}),
    ("best_of", 3, NO, {}),
    ("add_special_tokens", False, OK, {}),
    ("prompt_embeds", "AAAA", NO, {}),
]
CHAT = COMMON + [
    ("max_tokens", 3, OK, {}),
    ("max_completion_tokens", 3, OK, {}),
    ("logprobs", True, OK, {}),
    ("top_logprobs", 2, OK, {"logprobs": True}),
    ("tools", TOOLS, OK, {"tool_choice": "none"}),
    ("tool_choice", "required", OK, {"tools": TOOLS}),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}, OK, {"tools": TOOLS}),
    ("parallel_tool_calls", False, OK, {"tools": TOOLS, "tool_choice": "required"}),
    ("reasoning_effort", "low", NO, {}),
    ("include_reasoning", False, NO, {}),
    ("best_of", 2, NO, {}),
    ("echo", True, NO, {}),
    ("add_generation_prompt", False, OK, {}),
    ("continue_final_message", True, OK, {"add_generation_prompt": False}),
    ("add_special_tokens", True, NO, {}),
    ("documents", [{"title": "t", "text": "x"}], NO, {}),
    ("chat_template", "{{ messages }}", NO, {}),
    ("chat_template_kwargs", {"enable_thinking": False}, OK, {}),
    ("mm_processor_kwargs", {"k": 1}, NO, {}),
    ("structural_tag", "{}", NO, {}),
    ("functions", [{"name": "f"}], NO, {}),
    ("audio", {"voice": "x"}, NO, {}),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    workers = [FakeWorker("prefill", reply, eos).start(), FakeWorker("decode", reply, eos).start()]
    harness = GatewayHarness(_make_config(folder, workers[:1], workers[1:]))
    yield openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="unused", max_retries=0)
    harness.close()
    for w in workers:
        w.stop()


def _check(create, name, value, treatment, needed):
    body = {name: value, **needed}
    if treatment == NO:
        with pytest.raises(openai.BadRequestError) as err:
            create(extra_body=body)
        assert err.value.body["param"] == name, err.value.body
        return
    if treatment == META:
        assert name in IGNORED  # documented as metadata, not silently dropped by accident
    out = create(extra_body=body)
    if body.get("stream"):
        out = list(out)
        assert out
    else:
        assert out.choices


@pytest.mark.parametrize("name, value, treatment, needed", COMPLETIONS, ids=lambda x: str(x)[:20])
def test_completion_fields(client, name, value, treatment, needed):
    def create(extra_body):
        return client.completions.create(
            model="tiny", prompt="hi", max_tokens=2, extra_body=extra_body
        )

    _check(create, name, value, treatment, needed)


@pytest.mark.parametrize("name, value, treatment, needed", CHAT, ids=lambda x: str(x)[:20])
def test_chat_fields(client, name, value, treatment, needed):
    def create(extra_body):
        return client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body=extra_body,
        )

    _check(create, name, value, treatment, needed)


def test_null_and_no_op_values_are_accepted(client):
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={
            "bad_words": [],
            "prompt_logprobs": None,
            "tool_choice": "none",
            "continue_final_message": False,
            "response_format": {"type": "text"},
        },
    )
    assert out.choices[0].message.content


def test_unsupported_nested_fields_name_their_path(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            max_tokens=2,
            messages=[{"role": "assistant", "content": "x", "refusal": "no"}],
        )
    assert err.value.body["param"] == "messages.refusal"


def test_tool_choice_errors_name_their_field(client):
    def create(**kw):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kw
            )
        return err.value.body["param"]

    assert create(tools=TOOLS) == "tool_choice"  # auto needs --enable-auto-tool-choice
    assert create(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}) == (
        "tool_choice"
    )
    assert create(tool_choice="required") == "tool_choice"
    assert create(tools=[{"type": "retrieval"}], tool_choice="none") == "tools"
    assert (
        create(tools=TOOLS, tool_choice="required", extra_body={"guided_regex": "a"})
        == "tool_choice"
    )
