"""Incremental detokenization, stop strings and context-length checks, without any server."""

from __future__ import annotations

import random

import pytest
from test_gateway_fakes import REPLY, build_tiny_model_folder

from contract.text import IncrementalDetokenizer, StopStringMatcher
from gateway.choice_output import ChoiceOutput
from gateway.errors import GatewayError
from gateway.schema import GenerationParams
from gateway.tokenizer import GatewayTokenizer
from gateway.validation import resolve_max_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return GatewayTokenizer(build_tiny_model_folder(tmp_path_factory.mktemp("tiny")))


def stream_text(tok, prompt_ids, ids, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip)
    pieces = [detok.add(t) for t in ids]
    return pieces, "".join(pieces) + detok.flush()


def test_deltas_add_up_and_never_split_a_character(tok):
    ids = tok.encode(REPLY)
    pieces, text = stream_text(tok, tok.encode("prompt "), ids)
    assert text == REPLY
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens are partial UTF-8 sequences


def test_random_token_sequences_match_a_full_decode(tok):
    rng = random.Random(0)
    specials = [tok._tok.token_to_id(s) for s in ("<|im_start|>", "<|im_end|>")]
    alphabet = tok.encode("aé✓ wörld") + specials
    for _ in range(200):
        ids = [rng.choice(alphabet) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            _, text = stream_text(tok, [5, 6], ids, skip)
            assert text == tok.decode(ids, skip_special_tokens=skip), ids


def test_flush_returns_a_trailing_partial_character(tok):
    partial = tok.encode("✓")[:2]
    pieces, text = stream_text(tok, [], partial)
    assert pieces == ["", ""] and text == tok.decode(partial)


def feed_all(matcher, pieces):
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


def test_stop_string_across_pieces_is_cut_and_reported():
    m = StopStringMatcher(["STOP"])
    assert feed_all(m, ["abc S", "T", "OP tail"]) == "abc "
    assert m.matched == "STOP"


def test_stop_string_included_when_asked():
    m = StopStringMatcher(["STOP"], include_in_output=True)
    assert feed_all(m, ["abc ST", "OP", "more"]) == "abc STOP"


def test_text_that_might_start_a_stop_is_held_back_then_released():
    m = StopStringMatcher(["xyz"])  # the last len("xyz") - 1 characters wait for more text
    assert m.feed("abx") == "a"
    assert m.feed("y") == "b"
    assert m.feed("!") == "x"
    assert m.flush() == "y!"
    assert m.matched is None


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w"])
    assert feed_all(m, ["hello world"]) == "hel"
    assert m.matched == "lo w"


def test_choice_output_drops_tokens_after_the_stop(tok):
    params = GenerationParams(stop=("wor",))
    out = ChoiceOutput(0, tok, [], params)
    ids = tok.encode(REPLY)
    delta = out.on_chunk(ids, None, None)
    assert (delta.text, delta.finish_reason, delta.stop_reason) == ("Hello ", "stop", "wor")
    assert tok.decode(delta.token_ids).startswith("Hello wor")
    assert len(delta.token_ids) < len(ids)
    assert out.on_chunk(ids, None, "length").token_ids == []  # finished: nothing more


def test_choice_output_reports_a_stop_token_id(tok):
    eos = tok.eos_token_ids[0]
    out = ChoiceOutput(0, tok, [], GenerationParams(stop_token_ids=(eos,)))
    delta = out.on_chunk(tok.encode("Hi") + [eos], None, "stop")
    assert (delta.text, delta.finish_reason, delta.stop_reason) == ("Hi", "stop", eos)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_tokens_text_is_dropped_unless_included(tok, include):
    """vLLM's detokenizer: the token a worker stopped on (EOS or stop_token_ids) adds no text
    unless include_stop_str_in_output; its id stays in token_ids."""
    stop = tok.encode(" world")[-1]
    params = GenerationParams(
        stop_token_ids=(stop,), include_stop_str_in_output=include, skip_special_tokens=False
    )
    out = ChoiceOutput(0, tok, [], params)
    first = out.on_chunk(tok.encode("Hello"), None, None)
    last = out.on_chunk([stop], None, "stop")
    assert first.text + last.text == ("Hello" + tok.decode([stop], False) if include else "Hello")
    assert (last.token_ids, last.stop_reason, out.token_ids[-1]) == ([stop], stop, stop)
    eos = tok.eos_token_ids[0]
    out = ChoiceOutput(0, tok, [], GenerationParams(include_stop_str_in_output=include,
                                                    skip_special_tokens=False))
    delta = out.on_chunk(tok.encode("Hi") + [eos], None, "stop")
    assert delta.text == ("Hi" + tok.decode([eos], False) if include else "Hi")
    assert delta.token_ids[-1] == eos and delta.stop_reason is None


def test_context_length_checks_name_the_lengths():
    assert resolve_max_tokens(10, None, 64) == 54
    assert resolve_max_tokens(10, 54, 64) == 54
    with pytest.raises(GatewayError, match="64 tokens.*65 tokens .10 in the prompt, 55"):
        resolve_max_tokens(10, 55, 64)
    with pytest.raises(GatewayError, match="prompt has 64 tokens"):
        resolve_max_tokens(64, None, 64)
