"""protobuf <-> the sampling contract. Both messages that carry sampling fields
(`pdserve.v1.GenerationParams` from clients, `pdserve.v1.SamplingParams` to workers) name them as
`contract.sampling` does, so conversion goes by name; tests check the names agree."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from contract.limits import MAX_LOGPROBS
from contract.structured import StructuredOutputs

# Message-typed fields and the contract dataclass each one is (its fields named as the message's).
_MESSAGES: dict[str, type] = {"StructuredOutputs": StructuredOutputs}


def fields_from_pb(message: Any) -> dict[str, Any]:
    """The fields that are set (an unset `optional` is absent: the reader's default applies);
    repeated fields always, as tuples, and maps as dicts."""
    values: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        if _is_map(fd):
            values[fd.name] = dict(getattr(message, fd.name))
        elif _repeated(fd):
            values[fd.name] = tuple(getattr(message, fd.name))
        elif message.HasField(fd.name):
            value = getattr(message, fd.name)
            if fd.message_type is not None:
                value = _MESSAGES[fd.message_type.name](**fields_from_pb(value))
            values[fd.name] = value
    return values


def fields_to_pb(message: Any, values: Mapping[str, Any]) -> Any:
    """Set `values` on `message` (None stays unset; sequences fill repeated fields)."""
    descriptor = message.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        if value is None:
            continue
        if _is_map(descriptor[name]):
            getattr(message, name).update(value)
        elif _repeated(descriptor[name]):
            getattr(message, name).extend(value)
        elif descriptor[name].message_type is not None:  # a contract dataclass
            getattr(message, name).SetInParent()
            fields_to_pb(getattr(message, name), _defaults_unset(value))
        else:
            setattr(message, name, value)
    return message


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5.29; `label` is gone in 7
    return bool(flag) if flag is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def _defaults_unset(value: Any) -> dict[str, Any]:
    """A dataclass's fields, its defaults left unset (so `HasField` tells what was chosen)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if v != f.default:
            out[f.name] = v
    return out


def add_max_logprobs_arg(group) -> None:
    """`--max-logprobs`, as vLLM: the gateway answers 400 above it, a worker INVALID_ARGUMENT."""
    group.add_argument(
        "--max-logprobs",
        type=int,
        default=MAX_LOGPROBS,
        help=f"most logprobs / top_logprobs / prompt_logprobs a request may ask for, "
        f"0..{MAX_LOGPROBS} (default {MAX_LOGPROBS}); more is refused",
    )
