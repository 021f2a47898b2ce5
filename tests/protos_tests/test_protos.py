"""The generated protobuf code is committed, current, and importable as protos.pdserve.v1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_sampling_params_fields_have_presence():
    from protos.pdserve.v1 import common_pb2

    params = common_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")  # 0.0 set explicitly is distinguishable from unset


def test_services_are_generated():
    from protos.pdserve.v1 import kvtransfer_pb2_grpc, worker_pb2_grpc

    assert hasattr(worker_pb2_grpc, "PrefillServiceStub")
    assert hasattr(worker_pb2_grpc, "DecodeServiceServicer")
    assert hasattr(kvtransfer_pb2_grpc, "add_KVTransferServiceServicer_to_server")


def test_kv_handle_round_trips():
    from protos.pdserve.v1 import worker_pb2

    handle = worker_pb2.KVHandle(transfer_id="t-1", block_ids=[3, 1, 2], num_tokens=40, epoch=7)
    again = worker_pb2.KVHandle.FromString(handle.SerializeToString())
    assert list(again.block_ids) == [3, 1, 2]
    assert again.epoch == 7
