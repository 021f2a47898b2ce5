"""The structured-output manager without a model: compile + cache, matcher, batch bitmask and
its application, and the UTF-8 / JSON fixes over xgrammar's grammars."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB_SIZE, build_tokenizer

from contract.structured import StructuredOutputs
from engine.structured_output import StructuredOutputManager, accept, apply_bitmask

EOS = 2


@pytest.fixture(scope="module")
def manager():
    return StructuredOutputManager(build_tokenizer(), VOCAB_SIZE, {EOS})


def _accepts(manager, spec, data: bytes) -> bool:
    return manager.matcher(spec).accept_string(data)


def test_grammars_are_compiled_once_per_spec(manager):
    before = manager.num_compiled
    spec = StructuredOutputs(json={"type": "integer", "minimum": 0, "maximum": 9})
    for _ in range(3):
        manager.matcher(spec)
    manager.matcher(StructuredOutputs(json={"minimum": 0, "maximum": 9, "type": "integer"}))
    assert manager.num_compiled == before + 1  # a dict schema is serialized with sorted keys


def test_outputs_are_valid_utf8_and_valid_json(manager):
    bounded = StructuredOutputs(json={"type": "string", "maxLength": 3})
    assert _accepts(manager, bounded, '"é😀"'.encode())
    assert not _accepts(manager, bounded, b'"\xed\xbe\x80"')  # a UTF-16 surrogate: not UTF-8
    assert not _accepts(manager, bounded, b'"\x04"')  # JSON forbids raw control characters
    assert not _accepts(manager, StructuredOutputs(regex="[^a]+"), b"\xed\xa0\x80")
    assert not _accepts(manager, StructuredOutputs(json_object=True), b"[1]")  # objects only


def test_choice_literals_are_kept_verbatim(manager):
    spec = StructuredOutputs(choice=("a[^b", 'say "hi"'))
    assert _accepts(manager, spec, b"a[^b") and _accepts(manager, spec, b'say "hi"')
    assert not _accepts(manager, spec, b"a[^\xed\xa0\x80b")


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputs(json={"type": "nope"}),
        StructuredOutputs(regex="(("),
        StructuredOutputs(grammar="root ::= undefined_rule"),
    ],
)
def test_what_does_not_compile_is_a_value_error(manager, spec):
    with pytest.raises(ValueError, match=spec.kind):
        manager.matcher(spec)


def test_bitmask_rows_constrain_only_their_rows(manager):
    matcher = manager.matcher(StructuredOutputs(choice=("a",)))
    assert manager.fill_bitmask([None, None]) is None
    bitmask = manager.fill_bitmask([None, matcher])
    logits = torch.zeros(2, VOCAB_SIZE)
    apply_bitmask(logits, bitmask)
    assert torch.isfinite(logits[0]).all()  # unconstrained row
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(build_tokenizer().decode([t]) == "a" for t in allowed)
    assert accept(matcher, allowed[0]) and accept(None, 123)
    bitmask = manager.fill_bitmask([matcher])
    logits = torch.zeros(1, VOCAB_SIZE)
    apply_bitmask(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]  # only the end
    assert accept(matcher, EOS) and matcher.is_terminated() and not accept(matcher, EOS)
