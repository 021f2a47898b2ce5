"""The gateway's torch-free tokenizer agrees with transformers' AutoTokenizer on the same folder:
ids, text, special tokens and the rendered chat template."""

from __future__ import annotations

import pytest
from test_gateway_fakes import build_tiny_model_folder

from gateway.schema import ChatMessage
from gateway.tokenizer import ChatTemplateError, GatewayTokenizer

TEXTS = [
    "hello world",
    "the quick brown fox",
    " leading space",
    "ünïcode ✓ and 漢字",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
CONVERSATION = [
    ChatMessage("system", "be brief"),
    ChatMessage("user", "hello there"),
    ChatMessage("assistant", "hi"),
    ChatMessage("user", "and again?"),
]


@pytest.fixture(params=["tiny_llama", "byte_level"])
def folder(request, tiny_llama, tmp_path):
    if request.param == "tiny_llama":
        return tiny_llama  # saved by transformers' save_pretrained
    return build_tiny_model_folder(tmp_path)


def test_matches_transformers(folder):
    from transformers import AutoTokenizer

    ours, theirs = GatewayTokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, special)
            assert ids == theirs.encode(text, add_special_tokens=special), text
            for skip in (True, False):
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    plain = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    for add in (True, False):
        want = theirs.apply_chat_template(plain, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(CONVERSATION, add) == want
    assert theirs.eos_token_id in ours.eos_token_ids


def test_chat_template_override_from_a_file_or_text(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "m")
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    file = tmp_path / "t.jinja"
    file.write_text(template)
    for override in (str(file), template):
        tok = GatewayTokenizer(folder, chat_template=override)
        assert tok.apply_chat_template([ChatMessage("user", "x")]) == "[user]x"
    with pytest.raises(ValueError, match="neither a file nor a template"):
        GatewayTokenizer(folder, chat_template=str(tmp_path / "missing.jinja"))


def test_missing_chat_template_and_template_errors_are_clear(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "m")
    cfg = folder / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused"'))
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        GatewayTokenizer(folder).apply_chat_template([ChatMessage("user", "x")])
    raising = "{{ raise_exception('only user messages') }}"
    with pytest.raises(ChatTemplateError, match="only user messages"):
        GatewayTokenizer(folder, raising).apply_chat_template([ChatMessage("user", "x")])


def test_template_sandbox_blocks_attribute_escapes(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "m")
    evil = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        GatewayTokenizer(folder, evil).apply_chat_template([ChatMessage("user", "x")])


@pytest.mark.parametrize("final", ["Sure, the answer is", "  spaced out  ", "line\n"])
def test_continue_final_message_matches_transformers(folder, final):
    from transformers import AutoTokenizer

    ours, theirs = GatewayTokenizer(folder), AutoTokenizer.from_pretrained(folder)
    conversation = [*CONVERSATION, ChatMessage("assistant", final)]
    plain = [{"role": m.role, "content": m.content} for m in conversation]
    want = theirs.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    got = ours.apply_chat_template(conversation, False, continue_final_message=True)
    assert got == want
    assert got.endswith(final.strip()) or got.endswith(final.lstrip())
    closed = ours.apply_chat_template(conversation, False)
    assert closed.startswith(got) and len(closed) > len(got)  # the end-of-turn marker is gone


def test_continue_final_message_refusals(folder):
    tok = GatewayTokenizer(folder)
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        tok.apply_chat_template(CONVERSATION, True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="needs a final message with content"):
        tok.apply_chat_template(
            [*CONVERSATION, ChatMessage("assistant", " ")], False, continue_final_message=True
        )


def test_template_kwargs_reach_the_template_and_may_not_replace_the_servers(tmp_path):
    folder = build_tiny_model_folder(tmp_path)
    template = "{% if shout %}LOUD {% endif %}{{ messages[-1]['content'] }}"
    tok = GatewayTokenizer(folder, chat_template=template)
    message = [ChatMessage("user", "x")]
    assert tok.apply_chat_template(message, template_kwargs={"shout": True}) == "LOUD x"
    assert tok.apply_chat_template(message, template_kwargs={"shout": False}) == "x"
    for name in ("messages", "add_generation_prompt", "tools", "eos_token"):
        with pytest.raises(ChatTemplateError, match=f"may not set {name}"):
            tok.apply_chat_template(message, template_kwargs={name: 1})
