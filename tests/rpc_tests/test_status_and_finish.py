"""The one error -> status table and the one finish-reason map."""

from __future__ import annotations

import grpc
import pytest

from contract.errors import ErrorKind, kind_of
from contract.finish import FINISH_REASONS
from engine.engine import QueueFullError
from engine.engine_loop import EngineLoopStopped, EngineStepError
from gateway.errors import GatewayError
from kvtransfer.chunking import ChecksumError, TransferError
from kvtransfer.exporter import StaleEpochError
from kvtransfer.layout import IncompatibleLayoutError
from kvtransfer.lease import ExpiredLeaseError, UnknownLeaseError
from kvtransfer.pages import KVAddressError
from protos.pdserve.v1 import common_pb2
from rpc import finish
from rpc.status import KIND_OF_HTTP, STATUS, details_of, http_status, status_for
from worker.errors import WorkerDrainingError

C = grpc.StatusCode


@pytest.mark.parametrize(
    "exc, code",
    [
        (QueueFullError("full"), C.RESOURCE_EXHAUSTED),
        (WorkerDrainingError("draining"), C.UNAVAILABLE),
        (EngineLoopStopped("stopped"), C.UNAVAILABLE),
        (EngineStepError("step"), C.INTERNAL),
        (IncompatibleLayoutError("layout"), C.FAILED_PRECONDITION),
        (UnknownLeaseError("lease"), C.FAILED_PRECONDITION),
        (ExpiredLeaseError("lease"), C.FAILED_PRECONDITION),
        (StaleEpochError("epoch"), C.FAILED_PRECONDITION),
        (ChecksumError("crc"), C.DATA_LOSS),
        (TransferError("order"), C.INTERNAL),
        (KVAddressError("block"), C.INVALID_ARGUMENT),
        (ValueError("bad"), C.INVALID_ARGUMENT),
        (RuntimeError("?"), C.INTERNAL),
        (GatewayError(ErrorKind.OVERLOADED, "busy"), C.RESOURCE_EXHAUSTED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name,
)
def test_every_error_has_its_status(exc, code):
    assert status_for(exc) == code


def test_every_kind_has_a_grpc_code_and_an_http_status():
    assert set(STATUS) == set(ErrorKind)
    assert http_status(ErrorKind.INVALID) == 400 and http_status(ErrorKind.OVERLOADED) == 429
    assert KIND_OF_HTTP[503] is ErrorKind.UNAVAILABLE and KIND_OF_HTTP[500] is ErrorKind.INTERNAL


def test_kind_of_an_instance_beats_its_class():
    assert kind_of(GatewayError(ErrorKind.NOT_FOUND, "no such model")) is ErrorKind.NOT_FOUND


def test_long_details_are_cut_below_the_metadata_limit():
    assert len(details_of(ValueError("x" * 10_000))) == 1024


def test_the_finish_reason_map_covers_the_proto_enum():
    enum_values = set(common_pb2.FinishReason.values())
    assert set(finish.TO_PB.values()) == enum_values
    assert set(finish.FROM_PB.values()) == set(FINISH_REASONS)
    for reason in FINISH_REASONS:
        assert finish.finish_reason_from_pb(finish.finish_reason_to_pb(reason)) == reason
    # the engine's prefill-only reason never reaches a client: it reads as an abort
    assert finish.finish_reason_to_pb("prefill") == common_pb2.FINISH_REASON_ABORT
