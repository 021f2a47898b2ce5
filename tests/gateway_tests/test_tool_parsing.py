"""Tool-call parsers and tool history in the chat template (no workers)."""

from __future__ import annotations

import json

from test_gateway_fakes import build_tiny_model_folder

from gateway.openai.protocol import ChatCompletionRequest
from gateway.tokenizer import GatewayTokenizer
from gateway.tool_parsers import parse_hermes, parse_llama3_json

HERMES_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}"
    "{% if m.name %}<{{ m.name }}>{% endif %}{{ m.content }}\n{% endfor %}"
)


def test_hermes_blocks_become_calls_and_the_rest_content():
    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    text += '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    parsed = parse_hermes(text)
    assert parsed.content == "Let me look."
    assert [(n, json.loads(a)) for n, a in parsed.calls] == [("f", {"x": 1}), ("g", {})]
    assert parse_hermes("no calls here").calls == []
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_hermes(broken).calls == [] and parse_hermes(broken).content == broken


def test_llama3_json_calls():
    parsed = parse_llama3_json(
        '<|python_tag|>{"name": "f", "parameters": {"a": "b"}}; {"name": "g", "parameters": {}}'
    )
    assert [n for n, _ in parsed.calls] == ["f", "g"] and parsed.content is None
    assert parse_llama3_json("plain words").calls == []
    assert parse_llama3_json('{"no": "name"}').calls == []


def test_tool_history_reaches_the_template(tmp_path):
    folder = build_tiny_model_folder(tmp_path)
    tok = GatewayTokenizer(folder, chat_template=HERMES_TEMPLATE)
    body = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "42"},
        ],
    )
    tools = ({"type": "function", "function": {"name": "f"}},)
    text = tok.apply_chat_template(body.chat_messages(), True, tools)
    assert (
        text
        == 'TOOLS:f;[user]hi\n[assistant]<tool_call>f{"x": 1}</tool_call>\n[tool](call_1)<f>42\n'
    )
