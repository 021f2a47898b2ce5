"""Structured outputs and tool calling through real processes (gateway + prefill worker + decode worker, tiny
random Llama) with the official `openai` client: every output validates against its schema,
greedy outputs equal one engine's (so the decode worker continued from the prefill worker's
grammar state), and bad constraints are 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from test_gateway_integration import GatewayProcess, remote_prefills, wait_healthy
from test_workers_integration import Worker

from engine.llm import LLM
from engine.sampling_params import SamplingParams, StructuredOutputsParams

LONG = "the quick brown fox jumps over the lazy dog and prefill on one worker"  # remote prefill
SHORT = "hello"  # prefilled on the decode worker
EAGER = "--enforce-eager"

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "kind": {"enum": ["cat", "dog", "fox"]},
            "ok": {"type": "boolean"},
        },
        "required": ["age", "kind", "ok"],
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 4},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
        },
        "required": ["name", "tags"],
    },
    {"type": "string", "pattern": "^[a-c]{2,4}$"},
    {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]},
    {"const": {"v": 1}},
    {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
        },
        "required": ["inner"],
    },
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": [1, 2]}], "items": False},
]


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    logs = tmp_path_factory.mktemp("structured-logs")
    # Eager: the grammar work is in the sampler, whichever forward produced the logits.
    p = Worker("prefill", tiny_llama, logs / "prefill.log", "--kv-lease-ms", "20000", EAGER)
    d = Worker("decode", tiny_llama, logs / "decode.log", EAGER)
    g = None
    try:
        p.wait_listening()
        d.wait_listening()
        g = GatewayProcess(
            tiny_llama,
            p.address,
            d.address,
            logs / "gateway.log",
            "--tool-call-parser",
            "hermes",
            "--enable-auto-tool-choice",
        )
        g.wait_listening()
        wait_healthy(g.http)
        g.client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused", max_retries=0)
        yield g
    finally:
        codes = [g.terminate()] if g is not None else []
        codes += [p.terminate(), d.terminate()]
        assert codes == [0] * len(codes), (codes, g.log_tail() if g else "")


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu", enforce_eager=True)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_every_sampled_output_validates_against_its_schema(cluster, i):
    schema = SCHEMAS[i]
    out = cluster.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": LONG}],
        response_format=_schema_format(schema),
        n=3,
        seed=i,
        temperature=1.0,
        max_tokens=60,
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_greedy_disaggregated_equals_one_engine(cluster, offline):
    """The prefill worker samples the first token under the grammar and the decode worker
    continues from it: the text equals the offline engine's, and it went through the prefill
    worker."""
    schema = SCHEMAS[0]
    before = remote_prefills(cluster.http)
    out = cluster.client.completions.create(
        model="tiny",
        prompt=LONG,
        max_tokens=60,
        temperature=0.0,
        extra_body={"guided_json": schema},
    )
    assert remote_prefills(cluster.http) == before + 1
    params = SamplingParams(
        temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema)
    )
    expected = offline.generate(LONG, params, use_tqdm=False)[0].outputs[0]
    assert out.choices[0].text == expected.text
    jsonschema.validate(json.loads(out.choices[0].text), schema)


def test_seeded_structured_sampling_is_reproducible_and_streams(cluster):
    body = dict(
        model="tiny",
        prompt=SHORT,
        max_tokens=40,
        temperature=1.0,
        seed=7,
        n=2,
        extra_body={"structured_outputs": {"regex": "[a-z]{3,6}(-[0-9]{1,2})?"}},
    )
    first = cluster.client.completions.create(**body)
    again = cluster.client.completions.create(**body)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert all(re.fullmatch(r"[a-z]{3,6}(-[0-9]{1,2})?", t) for t in texts), texts
    chunks = list(cluster.client.completions.create(**body, stream=True))
    streamed = ["", ""]
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts


def test_choice_with_logprobs_and_the_old_names(cluster):
    choices = ["yes", "no", "maybe so"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        out = cluster.client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": LONG}],
            n=4,
            seed=1,
            max_tokens=10,
            logprobs=True,
            top_logprobs=2,
            extra_body=extra,
        )
        for c in out.choices:
            assert c.message.content in choices
            assert len(c.logprobs.content) >= 1 and all(
                len(t.top_logprobs) == 2 for t in c.logprobs.content
            )


def test_grammar_and_json_object(cluster):
    out = cluster.client.completions.create(
        model="tiny",
        prompt=SHORT,
        max_tokens=30,
        temperature=0.0,
        extra_body={"guided_grammar": 'root ::= "x=" [0-9] [0-9]? ";"'},
    )
    assert re.fullmatch(r"x=[0-9][0-9]?;", out.choices[0].text)
    # Any JSON object (strings unbounded: a random model may run out of tokens inside one;
    # this prompt's greedy object closes).
    out = cluster.client.completions.create(
        model="tiny",
        prompt=SHORT,
        max_tokens=40,
        temperature=0.0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].text), dict)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": _schema_format({"type": "nope"})}, "response_format"),
        ({"guided_regex": "(("}, "guided_regex"),
        ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        ({"guided_choice": []}, "guided_choice"),
    ],
)
def test_invalid_constraints_are_400(cluster, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        cluster.client.completions.create(
            model="tiny", prompt=SHORT, max_tokens=4, extra_body=extra
        )
    assert err.value.body["param"] == param, err.value.body


def test_a_grammar_only_the_engine_can_refuse_is_a_400(cluster):
    for prompt in (SHORT, LONG):  # on the decode worker, then on the prefill worker
        with pytest.raises(openai.BadRequestError) as err:
            cluster.client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=4,
                extra_body={"guided_grammar": "root ::= undefined_rule"},
            )
        assert "grammar" in err.value.message
    out = cluster.client.completions.create(model="tiny", prompt=LONG, max_tokens=2)
    assert out.choices[0].finish_reason == "length"  # the workers still serve


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def test_tool_call_then_result_then_answer(cluster):
    """A tiny random model calls only when made to: tool_choice names the function."""
    messages = [{"role": "user", "content": "weather in Paris for two days?"}]
    first = cluster.client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER, TIME],
        max_tokens=40,
        temperature=0.0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    final = cluster.client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER, TIME],
        max_tokens=8,
        temperature=0.0,
        tool_choice="none",
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the history reached it


def test_required_calls_a_declared_function(cluster):
    out = cluster.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": LONG}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        n=3,
        seed=3,
        max_tokens=60,
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            jsonschema.validate(
                json.loads(call.function.arguments), WEATHER["function"]["parameters"]
            )
    ids = [c.message.tool_calls[0].id for c in out.choices]
    assert len(set(ids)) == len(ids)


def test_streamed_tool_calls_have_openais_shape(cluster):
    stream = cluster.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": SHORT}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0.0,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["id"] = d.id or entry.get("id")
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_auto_tool_choice_parses_only_real_calls(cluster):
    """The random model writes no <tool_call> block: the text stays content."""
    out = cluster.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": SHORT}],
        tools=[WEATHER],
        max_tokens=6,
        temperature=0.0,
    )
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content and out.choices[0].finish_reason != "tool_calls"
