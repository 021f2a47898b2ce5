"""The one text stream (detokenizer + stop strings) that the gateway and the engine both run."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from contract.text import StopStringMatcher, TextStream


class CharDecoder:
    """Token i decodes to the i-th character of an alphabet; enough to drive the matcher."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.ALPHABET[t] for t in token_ids)


def ids(text: str) -> list[int]:
    return [CharDecoder.ALPHABET.index(c) for c in text]


def run(text: str, stops: list[str], **kw) -> tuple[str, str | None]:
    stream = TextStream(CharDecoder(), [], stops, **kw)
    out = "".join(stream.add(t) for t in ids(text)) + stream.flush()
    return out, stream.matched


def test_stop_across_tokens_is_cut_and_held_back():
    stream = TextStream(CharDecoder(), [], ["end"])
    pieces = [stream.add(t) for t in ids("the en")]
    assert "".join(pieces) == "the "  # "en" could still become "end": held back
    assert stream.add(ids("d")[0]) == "" and stream.matched == "end"
    assert stream.add(ids("x")[0]) == "" and stream.flush() == ""


def test_include_stop_and_release_at_end():
    assert run("say end now", ["end"], include_stop_str_in_output=True) == ("say end", "end")
    assert run("no match here", ["xyz"]) == ("no match here", None)


def test_earliest_of_several_stops_wins():
    assert run("abc. def\n", ["\n", "."]) == ("abc", ".")


def test_stop_inside_min_tokens_does_not_count():
    # "stop" lies in the first 4 tokens: not a stop; the later one is (vLLM's min_tokens rule).
    assert run("stop and stop", ["stop"], min_tokens=4) == ("stop and ", "stop")
    assert run("stop and stop", ["stop"], min_tokens=0) == ("", "stop")


def test_matcher_refuses_empty_stop():
    with pytest.raises(ValueError):
        StopStringMatcher([""])
