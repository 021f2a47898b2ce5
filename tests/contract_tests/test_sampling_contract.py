"""Every layer that carries sampling fields carries all of `contract.sampling.SAMPLING_FIELDS`:
each field's example goes through each layer and must come out unchanged, and each field's
invalid value must be refused by every layer that validates it. A field added to the contract and
missed by a layer fails here."""

from __future__ import annotations

import dataclasses

import pytest

from contract.sampling import FIELD_NAMES, GATEWAY_ONLY, SAMPLING_FIELDS, WORKER_FIELD_NAMES
from engine.sampling_params import SamplingParams
from gateway import grpc_service
from gateway.errors import ErrorKind, GatewayError
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from gateway.schema import GenerationParams
from gateway.validation import Limits, validate_params
from gateway.worker_client import SamplingRequest, _sampling_message
from pdserve.client import GenerationOptions, _fill_params
from protos.pdserve.v1 import common_pb2, gateway_pb2
from worker.wire import sampling_params_from_pb

EXAMPLES = {f.name: f.example for f in SAMPLING_FIELDS}
LIMITS = Limits(vocab_size=100, max_model_len=64, max_n=4, max_logprobs=20, max_stop_strings=4)


def _same(a, b) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return tuple(a) == tuple(b)
    return a == b


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_protos_name_the_contract_fields():
    assert [f.name for f in gateway_pb2.GenerationParams.DESCRIPTOR.fields] == list(FIELD_NAMES)
    worker_fields = [f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields]
    assert sorted(worker_fields) == sorted(WORKER_FIELD_NAMES)


@pytest.mark.parametrize(
    "cls, extra",
    [(GenerationParams, set(GATEWAY_ONLY)), (SamplingParams, set()), (GenerationOptions, set())],
)
def test_every_layer_declares_every_field(cls, extra):
    assert _field_names(cls) == set(FIELD_NAMES) | extra


@pytest.mark.parametrize("cls", [GenerationParams, SamplingParams])
def test_defaults_are_the_contract_defaults(cls):
    made = cls()
    for f in SAMPLING_FIELDS:
        assert _same(getattr(made, f.name), f.default), f.name


def test_client_to_gateway_carries_every_field():
    message = gateway_pb2.GenerateRequest().params
    _fill_params(message, GenerationOptions(**EXAMPLES))
    params = grpc_service._params_from_proto(message)
    for name, example in EXAMPLES.items():
        assert _same(getattr(params, name), example), name


def test_gateway_to_worker_to_engine_carries_every_worker_field():
    params = GenerationParams(**EXAMPLES)
    sampling = SamplingRequest(params, max_tokens=EXAMPLES["max_tokens"], seed=EXAMPLES["seed"])
    engine_params = sampling_params_from_pb(_sampling_message(sampling))
    for name in WORKER_FIELD_NAMES:
        assert _same(getattr(engine_params, name), EXAMPLES[name]), name


def _json_value(v):
    if dataclasses.is_dataclass(v):  # structured_outputs: the set fields, as vLLM's object
        return {
            f.name: getattr(v, f.name)
            for f in dataclasses.fields(v)
            if getattr(v, f.name) != f.default
        }
    if isinstance(v, dict):  # logit_bias: JSON object keys are strings
        return {str(k): x for k, x in v.items()}
    return list(v) if isinstance(v, tuple) else v


def _openai_body(chat: bool) -> dict:
    body = {name: _json_value(v) for name, v in EXAMPLES.items()}
    if chat:
        body["top_logprobs"] = body.pop("logprobs")
        body["logprobs"] = True
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return body


@pytest.mark.parametrize("request_cls", [CompletionRequest, ChatCompletionRequest])
def test_openai_routes_carry_every_field(request_cls):
    params = request_cls(**_openai_body(request_cls is ChatCompletionRequest)).to_params()
    for name, example in EXAMPLES.items():
        assert _same(getattr(params, name), example), name


def test_the_examples_are_valid_everywhere():
    validate_params(GenerationParams(**EXAMPLES), LIMITS)
    SamplingParams(**EXAMPLES)


@pytest.mark.parametrize(
    "f", [f for f in SAMPLING_FIELDS if f.invalid is not None], ids=lambda f: f.name
)
def test_invalid_values_are_refused_by_the_gateway_and_the_engine(f):
    with pytest.raises(GatewayError) as err:
        validate_params(GenerationParams(**{f.name: f.invalid}), LIMITS)
    assert err.value.kind is ErrorKind.INVALID and err.value.param == f.name
    with pytest.raises(ValueError):
        SamplingParams(**{f.name: f.invalid})
